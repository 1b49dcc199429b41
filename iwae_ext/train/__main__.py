"""python -m iwae_ext.train: the same as iwae-train."""
from ..cli import train_main

raise SystemExit(train_main())
