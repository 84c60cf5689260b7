"""The generated sections of bench/RESULTS.md, shared by the benchmark scripts."""

import os


def update_results(path, section, name):
    """Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in `path` with
    `section` (appending the block when the markers are missing); hand-written text stays."""
    begin, end = "<!-- %s:begin -->" % name, "<!-- %s:end -->" % name
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n\n"
    block = "%s\n%s%s" % (begin, section, end)
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)
