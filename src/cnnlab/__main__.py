"""`python -m cnnlab` is the same as the `cnnlab` command (torchrun needs the module form)."""

from cnnlab.cli import main

raise SystemExit(main())
