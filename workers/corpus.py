"""Long natural text built offline from files that ship with the operating system or Python.

Two sources, each recorded with its origin and licence so results can name what was measured:

- Debian's `/usr/share/common-licenses/*`: the full texts of common free-software licences
  (plain English legal prose, thousands of tokens each). The licence documents themselves
  allow verbatim copying and distribution ("Everyone is permitted to copy and distribute
  verbatim copies of this license document, but changing it is not allowed" for the GNU
  texts); we only read them.
- The docstrings of a fixed list of Python standard-library modules (English technical prose,
  Python Software Foundation License). They vary slightly with the Python version, which is
  recorded.

`nll_texts()` gives the texts whose perplexity the harness measures, `long_nll_texts()` the same
prose extended to long contexts (the calibration and the GPU quality bench); `haystack_paragraphs()`
gives filler paragraphs for the retrieval tasks (bench/ruler.py), drawn from *other* licence
texts so a retrieval prompt never repeats an NLL text. It lives in the package because
`proxyprefill calibrate` measures on the same texts (bench/ is not installed).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import platform
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# A copy of the directory may be named where the system has none (the GPU machines).
LICENSE_DIR = Path(os.environ.get("PROXYPREFILL_LICENSE_DIR", "/usr/share/common-licenses"))

# The NLL licence text, and the ones the retrieval haystack is cut from.
NLL_LICENSE = "GPL-3"
HAYSTACK_LICENSES = ("GFDL-1.3", "LGPL-2.1", "MPL-2.0", "Apache-2.0", "GPL-2", "MPL-1.1")
# Appended to the NLL licence text for contexts longer than it (~8k tokens): none is a haystack text.
LONG_NLL_LICENSES = ("GPL-1", "LGPL-2", "GFDL-1.2", "LGPL-3", "Artistic", "CC0-1.0", "BSD")

# Standard-library modules with long, prose-like docstrings (module, classes and functions).
DOCSTRING_MODULES = (
    "argparse", "collections", "functools", "itertools", "inspect", "pathlib", "subprocess",
    "threading", "logging", "json", "re", "datetime", "decimal", "fractions", "statistics",
    "textwrap", "typing", "dataclasses", "contextlib", "heapq", "bisect", "shutil", "tempfile",
    "unittest", "doctest", "pickle", "csv", "zipfile", "tarfile", "difflib",
)  # fmt: skip


@dataclass
class Text:
    """One natural text with where it came from."""

    name: str
    text: str
    source: str
    license: str
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """Metadata for result files (no text; a hash identifies the exact content)."""
        return {
            "name": self.name,
            "source": self.source,
            "license": self.license,
            "chars": len(self.text),
            "sha256": hashlib.sha256(self.text.encode()).hexdigest(),
            **self.extra,
        }


def _normalise(text: str) -> str:
    """Join hard-wrapped lines into paragraphs; keep paragraph breaks."""
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if p)


def license_text(name: str) -> Text | None:
    """A Debian common-licences text, or None where the directory is absent (non-Debian)."""
    path = LICENSE_DIR / name
    if not path.is_file():
        return None
    return Text(
        name=f"license:{name}",
        text=_normalise(path.read_text(encoding="utf-8", errors="replace")),
        source=str(path.resolve()),
        license=f"{name} licence text; verbatim copying and distribution permitted by the document",
    )


def stdlib_docstrings(modules: tuple[str, ...] = DOCSTRING_MODULES) -> Text:
    """Module, class and function docstrings of the given standard-library modules, in order."""
    pieces = []
    with warnings.catch_warnings():  # some modules keep deprecated aliases (typing.io) that warn on access
        warnings.simplefilter("ignore", DeprecationWarning)
        for module_name in modules:
            pieces += _module_docstrings(module_name)
    return Text(
        name="python-stdlib-docstrings",
        text=_normalise("\n\n".join(pieces)),
        source=f"docstrings of Python {platform.python_version()} modules: {', '.join(modules)}",
        license="Python Software Foundation License",
        extra={"python": platform.python_version()},
    )


def _module_docstrings(module_name: str) -> list[str]:
    """The module's docstring, then its public classes' and functions' longer docstrings."""
    module = importlib.import_module(module_name)
    pieces = [inspect.getdoc(module) or ""]
    for attr in sorted(vars(module)):
        obj = getattr(module, attr)
        if attr.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:  # one-liners add little natural text
                pieces.append(doc)
    return [p for p in pieces if p]


def long_license_text() -> Text | None:
    """The NLL licence text followed by the other licences that no retrieval haystack uses
    (~26k tokens in all, for NLL at long contexts), or None where the directory is absent."""
    texts = [t for t in (license_text(n) for n in (NLL_LICENSE, *LONG_NLL_LICENSES)) if t is not None]
    if not texts or texts[0].name != f"license:{NLL_LICENSE}":
        return None
    return Text(
        name="licenses:" + "+".join([NLL_LICENSE, *LONG_NLL_LICENSES]),
        text="\n\n".join(t.text for t in texts),
        source=", ".join(t.source for t in texts),
        license="licence texts; verbatim copying and distribution permitted by each document",
    )


def nll_texts() -> list[Text]:
    """The texts for the perplexity comparison: the GPL-3 text (where shipped) and docstrings."""
    texts = [license_text(NLL_LICENSE), stdlib_docstrings()]
    return [t for t in texts if t is not None]


def long_nll_texts() -> list[Text]:
    """The NLL texts long enough for long contexts: the licence prose extended past GPL-3 (GPL-3
    stays its first ~7k tokens) and the docstrings (~40k tokens)."""
    texts = [long_license_text(), stdlib_docstrings()]
    return [t for t in texts if t is not None]


def haystack_paragraphs() -> tuple[list[str], list[dict]]:
    """Filler paragraphs for retrieval prompts, and the metadata of the texts they came from.

    Licence texts other than the NLL one; without them (a non-Debian system), the docstrings
    of modules not used for NLL.
    """
    texts = [t for t in (license_text(name) for name in HAYSTACK_LICENSES) if t is not None]
    if not texts:
        texts = [stdlib_docstrings(("email", "http", "urllib", "asyncio", "sqlite3", "xml", "tkinter"))]
    paragraphs = [p for t in texts for p in t.text.split("\n\n") if len(p) > 40]
    return paragraphs, [t.describe() for t in texts]
