"""A screenshot of the playground (`dynamoe serve`'s page at /) after one generation, in a headless Chromium.

    .venv/bin/python benchmarks/playground_screenshot.py runs/demo/quick/dynamic --out docs/serve-playground.png

Needs chromium, chromedriver and selenium (see dynamoe.serve.browser).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from dynamoe.checkpoint import load_model, load_tokenizer_for
from dynamoe.serve import ServeSettings, create_app
from dynamoe.serve.background import serve_in_thread
from dynamoe.serve.browser import headless_chromium, missing_browser, run_playground


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/serve-playground.png"))
    parser.add_argument("--prompt", default="KING HENRY. Once more unto the breach, dear friends, once more;")
    parser.add_argument("--max-tokens", type=int, default=80)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--threshold", type=float, default=None, help="the dial (default: as trained)")
    args = parser.parse_args()
    if missing_browser():
        raise SystemExit(missing_browser())
    model, _ = load_model(args.checkpoint, pack=True)
    app = create_app(model, load_tokenizer_for(args.checkpoint), ServeSettings(model_name=args.checkpoint.name))
    with tempfile.TemporaryDirectory() as profile, serve_in_thread(app) as url, headless_chromium(Path(profile)) as driver:
        figures = run_playground(driver, url, args.prompt, args.max_tokens, args.threshold, args.temperature)
        driver.save_screenshot(str(args.out))
    print(f"{args.out}: {figures}")


if __name__ == "__main__":
    main()
