"""``python -m quest_pl.report SWEEP_DIR``: rewrite a sweep's report (:func:`quest_pl.report.main`)."""

import sys

from quest_pl.report import main

sys.exit(main())
