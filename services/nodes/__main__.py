import asyncio
import sys

from services.nodes.cli import main

sys.exit(asyncio.run(main(sys.argv[1:])))
