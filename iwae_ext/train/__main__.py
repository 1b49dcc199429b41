"""Deprecated: ``python -m iwae_ext.train`` is ``python -m iwae_ext.cli.train`` (or ``iwae-train``)."""
from ..cli.train import main

raise SystemExit(main())
