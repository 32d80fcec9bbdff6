"""JupyterLab in a real headless Chromium: Debian's `chromium` and `chromedriver`, driven by Selenium.

The browser may only talk to loopback: every host name but 127.0.0.1 resolves to nothing, every
non-loopback address goes to a proxy that does not exist, and Chromium's own background traffic
(updates, safe browsing, metrics) is switched off.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("PYWORKER_ARTIFACTS") or ROOT / "build" / "e2e-artifacts")

LOOPBACK_ONLY = [
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--proxy-server=127.0.0.1:9",  # the discard port: nothing listens; loopback bypasses proxies
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--disable-domain-reliability",
    "--disable-client-side-phishing-detection", "--no-pings", "--no-first-run",
    "--metrics-recording-only", "--disable-features=OptimizationHints,MediaRouter,Translate",
]


def missing():
    """Why the browser cannot run here, or None."""
    for tool, pkg in (("chromium", "chromium"), ("chromedriver", "chromium-driver")):
        if not shutil.which(tool):
            return f"`{tool}` is not on PATH: apt-get install {pkg}"
    try:
        import selenium  # noqa: F401  (only whether it is installed)
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    return None


def start():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download a driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1000", *LOOPBACK_ONLY]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")),
                              options=opts)
    driver.set_page_load_timeout(60)
    return driver


def wait_css(driver, css, timeout_s, what, visible=True):
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout_s
    while True:
        found = [e for e in driver.find_elements(By.CSS_SELECTOR, css) if not visible or e.is_displayed()]
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: no {css!r} in the page after {timeout_s} s")
        time.sleep(0.25)


# A cell still not sent to the kernel this long after its run is run again (at most twice).
RERUN_AFTER_S = 15


def _first_prompt(driver):
    """The first cell's input prompt: "[ ]:" not run, "[*]:" running or queued, "[1]:" done."""
    found = driver.find_elements("css selector", ".jp-NotebookPanel .jp-Cell .jp-InputPrompt")
    return found[0].text.strip() if found else ""


def run_cell_in_new_notebook(base_url, token, code, marker, shot_name, timeout_s=180, log=print):
    """Open `base_url/lab?token=...`, create a notebook from the launcher, type `code` into its
    first cell, run it, and return the text of the output that contains `marker`.
    A screenshot is kept under ARTIFACTS (also when it fails); returns (output_text, path)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"{shot_name}.png"
    driver = start()
    t0 = time.monotonic()
    try:
        driver.get(f"{base_url}/lab?token={token}")
        card = wait_css(driver, '.jp-LauncherCard[data-category="Notebook"]', 90, "the Lab's launcher")[0]
        log(f"browser: JupyterLab launcher shown after {time.monotonic() - t0:.1f} s")
        card.click()
        editor = wait_css(driver, ".jp-NotebookPanel .jp-Cell .cm-content", 60, "a new notebook")[0]
        # The kernel is up when the status bar says Idle (a dialog would ask for one otherwise).
        wait_css(driver, '.jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status="idle"]', 90,
                 "the notebook's kernel to be idle")
        log(f"browser: notebook created, kernel idle after {time.monotonic() - t0:.1f} s")
        editor.click()
        ActionChains(driver).send_keys(code).perform()
        ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        deadline = time.monotonic() + timeout_s
        sent, runs = time.monotonic(), 1
        while True:
            outs = [o.text for o in driver.find_elements("css selector", ".jp-OutputArea-output")]
            hit = [o for o in outs if marker in o]
            if hit:
                break
            errors = [o for o in outs if "Traceback" in o or "Error" in o]
            prompt = _first_prompt(driver)
            if errors or time.monotonic() > deadline:
                raise AssertionError(f"the cell did not print {marker!r} (its prompt: {prompt!r}, "
                                     f"run {runs} time(s)); outputs: {outs}")
            # Seen once in CI: the run left the cell at "[ ]" (never sent: the kernel's
            # connection was not ready although the status bar said Idle). A cell that was
            # sent shows "[*]" at once: only one still at "[ ]" is run again.
            if prompt == "[ ]:" and time.monotonic() - sent > RERUN_AFTER_S and runs < 3:
                driver.find_elements("css selector", ".jp-NotebookPanel .jp-Cell .cm-content")[0].click()
                ActionChains(driver).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(
                    Keys.CONTROL).perform()
                sent, runs = time.monotonic(), runs + 1
                log(f"browser: the cell was not sent to the kernel; run {runs}")
            time.sleep(0.5)
        log(f"browser: cell ran, output read after {time.monotonic() - t0:.1f} s")
        return hit[-1], shot
    finally:
        try:
            driver.save_screenshot(str(shot))
            log(f"browser: screenshot {shot}")
        finally:
            driver.quit()
