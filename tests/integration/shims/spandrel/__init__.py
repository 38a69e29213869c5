"""Import-only stand-in of spandrel (it requires torchvision) for the integration harness (see ../_import_only.py)."""
import sys

from _import_only import stand_in

stand_in(sys.modules[__name__])
