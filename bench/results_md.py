"""The generated sections of bench/RESULTS.md, shared by the benchmark scripts."""

import os


def update_results(path, section, name):
    """Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in `path` with
    `section` (appending the block when the markers are missing); hand-written text stays."""
    begin, end = "<!-- %s:begin -->" % name, "<!-- %s:end -->" % name
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n\n"
    block = "%s\n%s%s" % (begin, section, end)
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def publish(results, text, json_path, out_path, name):
    """Prints the tables, saves the raw results as JSON and updates RESULTS.md, as asked."""
    import json

    print()
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    if out_path:
        update_results(out_path, text, name)
        print("updated %s" % out_path)
