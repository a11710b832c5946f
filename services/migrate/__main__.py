import asyncio
import sys

from services.migrate.cli import main

sys.exit(asyncio.run(main(sys.argv[1:])))
