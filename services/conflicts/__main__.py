import asyncio
import sys

from services.conflicts.cli import main

sys.exit(asyncio.run(main(sys.argv[1:])))
