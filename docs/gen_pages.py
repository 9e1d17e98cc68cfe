"""Pages made when the site is built (run by the mkdocs-gen-files plugin, see mkdocs.yml).

- `index.md`: README.md, the repository's front door, with its links into docs/ made relative to
  the site, so the strict build checks every link the README holds.
- `reference/configuration.md`: the configuration reference, rendered from conf/ by
  `handclip.tools.confdoc`, so it always describes the files as they are.
"""

import re
import sys
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's handclip, whichever environment runs mkdocs

from handclip.tools.confdoc import render  # noqa: E402

readme = (ROOT / "README.md").read_text(encoding="utf-8")
with mkdocs_gen_files.open("index.md", "w") as page:
    page.write(re.sub(r"\]\(docs/", "](", readme))

with mkdocs_gen_files.open("reference/configuration.md", "w") as page:
    page.write(render(ROOT / "conf"))
