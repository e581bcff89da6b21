"""A headless Chromium driven by Selenium, for the playground's browser test and its screenshot script.

Needs Debian's `chromium` and `chromium-driver` (or any chromium and chromedriver on PATH) and the
`selenium` package; no browser is downloaded. The flags keep the browser off the network and quiet.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1100,1000")


def missing_browser() -> str | None:
    """Why no headless browser can run here, or None when one can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if not (shutil.which("chromium") or shutil.which("chromium-browser")) or not shutil.which("chromedriver"):
        return "no chromium and chromedriver on PATH (Debian: apt-get install -y chromium chromium-driver)"
    return None


@contextmanager
def headless_chromium(profile: Path) -> Iterator[Any]:
    """A Selenium webdriver of a headless Chromium with a fresh profile in `profile`; quit when the block ends."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # An explicit driver path: Selenium would otherwise try to download one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


def run_playground(driver: Any, url: str, prompt: str, max_tokens: int, threshold: float | None = None,
                   temperature: float = 0.0, timeout_s: float = 60.0) -> dict[str, str]:
    """Open the playground at url, generate from prompt (at threshold, or as trained), wait for the end;
    the page's figures (status, token count, mean experts/token, tokens/s)."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    WebDriverWait(driver, timeout_s).until(lambda d: d.find_element("id", "legend").text)  # the model card has loaded
    driver.execute_script(
        "const [prompt, maxTokens, threshold, temperature] = arguments;"
        "document.getElementById('prompt').value = prompt;"
        "document.getElementById('max-tokens').value = maxTokens;"
        "document.getElementById('temperature').value = temperature;"
        "if (threshold !== null) { const dial = document.getElementById('dial'); dial.value = threshold;"
        "  dial.dispatchEvent(new Event('input')); }", prompt, max_tokens, threshold, temperature)
    driver.find_element("id", "generate").click()
    WebDriverWait(driver, timeout_s).until(lambda d: d.find_element("id", "status").text.startswith(("done", "error")))
    return {name: driver.find_element("id", name).text for name in ("status", "token-count", "mean-k", "tokens-per-s")}
