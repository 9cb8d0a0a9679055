"""The accuracy texts live in the package (`proxyprefill.workers.corpus`), where the calibration
command can reach them; this name keeps `import corpus` working for the bench scripts."""

from proxyprefill.workers.corpus import (  # noqa: F401
    DOCSTRING_MODULES,
    HAYSTACK_LICENSES,
    LICENSE_DIR,
    LONG_NLL_LICENSES,
    NLL_LICENSE,
    Text,
    haystack_paragraphs,
    license_text,
    long_license_text,
    long_nll_texts,
    nll_texts,
    stdlib_docstrings,
)
