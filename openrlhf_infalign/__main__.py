import sys

from openrlhf_infalign.cli import main

sys.exit(main())
