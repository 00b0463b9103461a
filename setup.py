"""Build glue pyproject.toml cannot express (metadata is in pyproject.toml).

The licence: setuptools >= 77 records an SPDX expression as `License-Expression` (PEP 639) and
deprecates the `project.license` table; Debian 12's setuptools 66.1 rejects the string form that
replaces it. Passing the expression here, in the keyword the building setuptools knows, gives an
SPDX string in the metadata on both without a deprecation warning."""

from __future__ import annotations

import setuptools

#: GPL-3.0-or-later: pyxs is LGPL-3.0 (not combinable with GPL-2.0-only code), click
#: BSD-3-Clause; the full text is in LICENSE.
LICENSE = "GPL-3.0-or-later"

_major = int(setuptools.__version__.split(".")[0])
_licence = {"license_expression": LICENSE} if _major >= 77 else {"license": LICENSE}

setuptools.setup(**_licence)
