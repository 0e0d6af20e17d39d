"""The capture contract under its published name: the module is ``service/capture/format.py``.

The flywheel's exporter, the tests and docs/capture-format.md (and any site's own script that reads the
capture folder) import ``service.capture_format``; the contract moved into the ``service.capture``
package without that name changing for them.
"""

from service.capture.format import *  # noqa: F403
