"""`python -m yoloscale ...`, so launchers that take a module (torchrun -m, deepspeed -m, accelerate launch -m) work."""

import sys

from yoloscale.cli import main

sys.exit(main())
