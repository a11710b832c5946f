import sys

from services.gateway.cli import main

sys.exit(main(sys.argv[1:]))
