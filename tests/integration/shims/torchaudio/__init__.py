"""Import-only stand-in of torchaudio for the integration harness (see ../_import_only.py)."""
import sys

from _import_only import stand_in

stand_in(sys.modules[__name__])
