"""Every flag of every `proxyprefill` command says what it does and what its default is."""

import argparse

import pytest

from proxyprefill import cli


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = None

    # build the parser the way main() does, without running a command
    original = argparse.ArgumentParser.parse_args

    def keep(self, args=None, namespace=None):
        nonlocal parser
        parser = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = keep
    try:
        with pytest.raises(SystemExit):
            cli.main(["info"])
    finally:
        argparse.ArgumentParser.parse_args = original
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_flag_documents_its_default(command):
    parser = _subcommands()[command]
    undocumented = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        text = (action.help or "").lower()
        if not text or not ("default" in text or "required" in text or action.required):
            undocumented.append("/".join(action.option_strings))
    assert undocumented == [], f"{command}: flags without help or default: {undocumented}"
