"""``python -m napari_ctvlp`` is the ``napari-ctvlp`` command."""

import sys

from napari_ctvlp.cli import main

sys.exit(main())
