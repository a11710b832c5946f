import sys

from services.storage.cli import main

sys.exit(main(sys.argv[1:]))
