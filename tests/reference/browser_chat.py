"""Drives the chat page of `llmlab serve` in headless Chromium (Debian's chromium and
chromium-driver, through Selenium's WebDriver client): types each message into #input, presses
Enter, records how the assistant's reply grows until the page marks it done, and prints JSON:

    {"reply": ..., "stats": ..., "tokens_per_second": ..., "finish": ..., "snapshots": [lengths],
     "model": ..., "error": ..., "html_elements": n, "turns": [per message], "console_errors": [...]}

    browser_chat.py URL MESSAGE [MESSAGE ...] [--api-key K | --type-api-key K] [--system S]
                    [--temperature T] [--max-tokens N] [--stop-after CHARS] [--expect-error]

The top-level fields are the last message's. Settings are typed into the page's fields;
--api-key is one the page kept from an earlier visit (set in its localStorage before it loads). Exits
non-zero with a message on stderr when a reply does not stream (fewer than two growing states of
the reply's text seen before it is done), is empty, or does not finish in --timeout seconds; with
--expect-error, when the page shows no error instead. --stop-after presses Stop (#stop) once the
reply has that many characters.
"""

import argparse
import json
import sys
import tempfile
import time
from urllib.parse import urljoin

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# Records every state of the last assistant bubble (text length, done) as it changes: a
# MutationObserver sees each append, which polling over WebDriver could miss.
OBSERVE = """
window.__snaps = [];
const box = document.getElementById('messages');
const rec = () => {
  const all = box.querySelectorAll('.msg.assistant');
  const last = all[all.length - 1];
  if (!last) return;
  const len = last.querySelector('.text').textContent.length, done = last.dataset.done === 'true';
  const s = window.__snaps, p = s[s.length - 1];
  if (!p || p.len !== len || p.done !== done) s.push({len, done, n: all.length});
};
new MutationObserver(rec).observe(box, {subtree: true, childList: true, characterData: true,
  attributes: true, attributeFilter: ['data-done']});
"""


def fail(msg, **extra):
    print(json.dumps(extra, indent=1), file=sys.stderr)
    sys.exit(f"browser_chat: {msg}")


def set_field(driver, id_, value):
    el = driver.find_element(By.ID, id_)
    driver.execute_script("arguments[0].closest('details')?.setAttribute('open', '')", el)
    el.clear()
    el.send_keys(value)
    # The page keeps a setting when its field changes (blur fires `change`).
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", el)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url")
    ap.add_argument("messages", nargs="+")
    ap.add_argument("--api-key", help="a key the page kept (localStorage) before it loads")
    ap.add_argument("--type-api-key", help="a key typed into Settings after the page loaded")
    ap.add_argument("--system")
    ap.add_argument("--temperature")
    ap.add_argument("--max-tokens")
    ap.add_argument("--stop-after", type=int)
    ap.add_argument("--expect-error", action="store_true")
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args()

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.TemporaryDirectory(prefix="llmlab-chromium-")
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile.name}", "--window-size=900,800"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    t_start = time.monotonic()
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.set_script_timeout(10)
        if args.api_key is not None:
            # The origin's storage, from a page of it that is not the chat (no request without it).
            driver.get(urljoin(args.url, "/health"))
            driver.execute_script("localStorage.setItem('llmlab.apiKey', arguments[0])", args.api_key)
            driver.get_log("browser")  # that page's messages (its favicon) are not the chat's
        driver.get(args.url)
        # The page asked v1/models for the model's name (or failed to, and says so).
        deadline = time.monotonic() + 30
        while driver.find_element(By.ID, "model").text == "connecting…":
            if time.monotonic() > deadline:
                fail("the page never loaded the model list")
            time.sleep(0.05)
        if args.type_api_key is not None:
            set_field(driver, "api-key", args.type_api_key)
        if args.system is not None:
            set_field(driver, "system", args.system)
        if args.temperature is not None:
            set_field(driver, "temperature", args.temperature)
        if args.max_tokens is not None:
            set_field(driver, "max-tokens", args.max_tokens)
        if args.type_api_key is not None:  # the page reloads the model list with the key
            time.sleep(0.3)
        driver.execute_script(OBSERVE)
        turns = []
        for message in args.messages:
            turns.append(turn(driver, message, args))
        result = dict(turns[-1], turns=turns, model=driver.find_element(By.ID, "model").text,
                      seconds=round(time.monotonic() - t_start, 2))
        logs = driver.get_log("browser")
        result["console_errors"] = [e["message"] for e in logs if e["level"] == "SEVERE"]
    finally:
        driver.quit()
        profile.cleanup()
    print(json.dumps(result, indent=1))


def turn(driver, message, args):
    n_before = len(driver.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant"))
    requests = int(driver.find_element(By.ID, "messages").get_attribute("data-requests") or 0)
    driver.execute_script("window.__snaps = []")
    box = driver.find_element(By.ID, "input")
    box.click()
    box.send_keys(message)
    box.send_keys(Keys.ENTER)
    deadline = time.monotonic() + args.timeout
    stopped = False
    while True:
        if time.monotonic() > deadline:
            fail(f"no finished reply to {message!r} within {args.timeout} s",
                 snapshots=driver.execute_script("return window.__snaps"))
        # The page counts a request finished last: what is read after it is final.
        finished = int(driver.find_element(By.ID, "messages").get_attribute("data-requests") or 0)
        error = driver.find_element(By.ID, "error").text
        bubbles = driver.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")
        if finished > requests:
            answered = len(bubbles) > n_before
            if args.expect_error:
                if not error or answered:
                    fail(f"expected an error, but the page answered {message!r}")
                return {"error": error, "input": box.get_attribute("value"), "snapshots": []}
            if not answered:
                fail(f"no reply to {message!r}; the page shows: {error!r}")
            break
        if len(bubbles) > n_before:
            last = bubbles[-1]
            if args.stop_after is not None and not stopped:
                if len(last.find_element(By.CLASS_NAME, "text").text) >= args.stop_after:
                    driver.find_element(By.ID, "stop").click()
                    stopped = True
        time.sleep(0.02)
    last = driver.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")[-1]
    text = last.find_element(By.CLASS_NAME, "text")
    snaps = driver.execute_script("return window.__snaps")
    growing = [s["len"] for s in snaps if not s["done"] and s["n"] == n_before + 1 and s["len"] > 0]
    stats = driver.find_element(By.ID, "stats")
    out = {
        "reply": driver.execute_script("return arguments[0].textContent", text),
        "stats": stats.text,
        "tokens_per_second": stats.get_attribute("data-tokens-per-second"),
        "finish": last.get_attribute("data-finish"),
        "snapshots": growing,
        "error": driver.find_element(By.ID, "error").text,
        "html_elements": len(text.find_elements(By.CSS_SELECTOR, "*")),
        "focused": driver.execute_script("return document.activeElement.id"),
    }
    if error or out["error"]:
        fail(f"the page shows an error: {out['error'] or error}", **out)
    if not out["reply"]:
        fail(f"empty reply to {message!r}", **out)
    if len(set(growing)) < 2 or growing != sorted(growing):
        fail(f"the reply to {message!r} did not stream: text lengths seen before done {growing}", **out)
    return out


if __name__ == "__main__":
    main()
