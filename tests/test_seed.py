"""The specification's examples run verbatim, with samplepipe as mario."""

import doctest
from pathlib import Path

SEED = Path(__file__).parent / "seed" / "checkpointing.txt"


def test_seed_document_examples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the wrap examples name relative folders
    text = SEED.read_text().replace(
        "import bob.pipelines as mario", "import samplepipe as mario"
    )
    parser = doctest.DocTestParser()
    test = parser.get_doctest(text, {}, "checkpointing.txt", str(SEED), 0)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted >= 25
    assert result.failed == 0
    assert list(tmp_path.iterdir()) == []  # wrap() creates nothing
