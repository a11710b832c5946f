"""mover: consumes ``move.requested`` jobs and C-STOREs instances from S3 to remote nodes."""
import sys

from services.mover.cli import main

sys.exit(main(sys.argv[1:]))
