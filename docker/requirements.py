"""Print the requirements of pyproject.toml's dependencies and the named extras, one a line.

The images install these before copying the sources, so that a change to the code
rebuilds only the last layer instead of downloading every package again:

    python docker/requirements.py serve cpu > /tmp/requirements.txt
"""

import sys

import tomllib

with open("pyproject.toml", "rb") as file:
    project = tomllib.load(file)["project"]
extras = project["optional-dependencies"]
unknown = [name for name in sys.argv[1:] if name not in extras]
if unknown:
    sys.exit(f"docker/requirements.py: no extra {', '.join(unknown)} in pyproject.toml")
lines = list(project["dependencies"])
for name in sys.argv[1:]:
    lines += extras[name]
sys.stdout.write("".join(f"{line}\n" for line in dict.fromkeys(lines)))
