"""codebook: sparse, discrete codebook features for Hugging Face causal language models.

The library is built in floors, each importing only its own floor and those below
(docs/architecture.md; tests/test_architecture.py checks it): the core (this package's modules,
``data``, ``kernels``), then ``training``, ``analysis``, ``compare`` and ``steering``, then
``store`` and ``browser``, then ``ray_glue`` (the only Ray code). The package itself exports
the core's public names.
"""

from codebook.config import CodebookConfig, SitePattern
from codebook.errors import ConfigError
from codebook.interventions import (
    CodeRecord,
    disable_codes,
    force_codes,
    force_codes_at_sites,
    patch_codes,
    read_codes,
    recording,
    swap_codes,
)
from codebook.layer import CodebookLayer
from codebook.model import CodebookModel, CodebookOutput
from codebook.sites import FAMILIES, PRESETS, Site, resolve_sites

__all__ = [
    "FAMILIES",
    "PRESETS",
    "CodeRecord",
    "CodebookConfig",
    "CodebookLayer",
    "CodebookModel",
    "CodebookOutput",
    "ConfigError",
    "Site",
    "SitePattern",
    "disable_codes",
    "force_codes",
    "patch_codes",
    "read_codes",
    "recording",
    "resolve_sites",
    "force_codes_at_sites",
    "swap_codes",
]
