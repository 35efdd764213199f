"""`python -m mmtune.cli ...` (what `accelerate launch -m mmtune.cli` and `torchrun -m mmtune.cli` run)."""

from mmtune.cli import main

raise SystemExit(main())
