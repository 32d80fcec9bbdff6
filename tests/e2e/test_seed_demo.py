"""The seed demo, as a user runs it: `helm install par ./chart --set workers=10`, then the URL and the
token command printed by the NOTES, then a notebook — over the Jupyter REST API and a kernel's
websocket, and in a real headless Chromium.

One release (10 workers, the Lab on a NodePort) serves every test of this module; only 127.0.0.1
(the NodePort) and the cluster are contacted.
"""
import os
import re
import time

import pytest

import browser
import imagelib
from e2elib import last_json, notes_command, run_as_user, wait_for

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def demo(k8s, module_namespace):
    ns = module_namespace
    t0 = time.monotonic()
    notes = k8s.install(ns, "demo", "lab.service.type=NodePort", workers=10, timeout="8m")
    print(f"helm install --set workers=10 --wait: {time.monotonic() - t0:.0f} s")
    assert "10 workers" in notes, notes

    token = run_as_user(k8s, notes_command(notes, r"get secret .*lab-token")).strip()
    assert re.fullmatch(r"\S{16,}", token), f"token command printed {token!r}"
    # The three lines of step 1, as printed; the URL is opened on 127.0.0.1 (a NodePort answers on
    # every address of the node), so traffic stays on loopback.
    url = run_as_user(k8s, "\n".join(notes_command(notes, pat) for pat in
                                      (r"^NODE_PORT=", r"^NODE_IP=", r'^echo "http'))).strip()
    m = re.fullmatch(r"http://([0-9.]+):(\d+)/lab", url)
    assert m, f"step 1 of the NOTES printed {url!r}"
    base = f"http://127.0.0.1:{m[2]}"
    wait_for(lambda: imagelib.http("GET", f"{base}/api/status", token)[0] == 200, 60,
             f"JupyterLab at {base}", on_fail=lambda: k8s.describe(ns))
    return {"ns": ns, "release": "demo", "base": base, "token": token, "notes": notes}


def test_lab_refuses_requests_without_the_token(demo):
    base, token = demo["base"], demo["token"]
    assert imagelib.http("GET", f"{base}/api/kernels")[0] in (401, 403)
    assert imagelib.http("GET", f"{base}/api/kernels", "not-the-token")[0] in (401, 403)
    assert imagelib.http("GET", f"{base}/lab", token)[0] == 200


def test_seed_demo_in_a_kernel_with_no_import(k8s, demo):
    kernel = imagelib.Kernel(demo["base"], demo["token"])
    try:
        r = kernel.execute(
            "import time, socket, json\n"
            "t0 = time.monotonic()\n"
            "fun = lambda i: (time.sleep(1), socket.gethostname())[1]\n"
            "res = pmap(fun, range(13))\n"
            "print('RESULT:' + json.dumps({'hosts': res, 'wall': time.monotonic() - t0}))\n",
            timeout_s=120)
        assert r["status"] == "ok", r
        out = last_json(r["stdout"])
        workers = set(k8s.worker_pods(demo["ns"], demo["release"]))
        hosts = set(out["hosts"])
        assert len(out["hosts"]) == 13
        assert hosts <= workers, (hosts, workers)
        assert len(hosts) >= 5, f"only {len(hosts)} distinct workers answered: {sorted(hosts)}"
        # 13 one-second tasks on 10 workers: two rounds, far from the 13 s of one process.
        assert out["wall"] < 8, f"pmap of 13 x 1 s took {out['wall']:.1f} s"
        print(f"seed demo: 13 x 1 s on {len(hosts)} distinct pods in {out['wall']:.2f} s")

        r = kernel.execute(
            "res = pmap(lambda x: (x, x * x + 7, str(x)), range(1000))\n"
            "print('RESULT:' + json.dumps(res))\n", timeout_s=120)
        assert r["status"] == "ok", r
        res = last_json(r["stdout"])
        assert res == [[x, x * x + 7, str(x)] for x in range(1000)]
    finally:
        kernel.close()


# A scorer that says which pod scored each split (48 bits of a hash of its hostname: exact in a
# float), so that cv_results_ tells where GridSearchCV's fits ran.
GRID_SEARCH = """
import hashlib, json, socket
import joblib
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

def host_score(estimator, X, y):
    import hashlib, socket
    return float(int.from_bytes(hashlib.sha256(socket.gethostname().encode()).digest()[:6], "big"))

X, y = load_digits(return_X_y=True)
grid = {"C": [0.1, 1.0, 10.0, 100.0], "gamma": [1e-4, 1e-3, 1e-2]}
scoring = {"acc": "accuracy", "host": host_score}
seq = GridSearchCV(SVC(), grid, cv=5, scoring=scoring, refit="acc", n_jobs=1).fit(X, y)
with joblib.parallel_config(backend="pyworker"):
    par = GridSearchCV(SVC(), grid, cv=5, scoring=scoring, refit="acc", n_jobs=-1).fit(X, y)
hosts = sorted({par.cv_results_[f"split{k}_test_host"][i] for k in range(5)
                for i in range(len(par.cv_results_["params"]))})
print("RESULT:" + json.dumps({
    "hosts": hosts, "lab": host_score(None, X, y),
    "seq": [list(seq.cv_results_["mean_test_acc"]), seq.best_params_, seq.best_score_],
    "par": [list(par.cv_results_["mean_test_acc"]), par.best_params_, par.best_score_]}))
"""


def _host_hash(name):
    import hashlib
    return float(int.from_bytes(hashlib.sha256(name.encode()).digest()[:6], "big"))


def test_scikit_learn_grid_search_with_n_jobs_minus_one_runs_on_the_workers(k8s, demo):
    """In a kernel with no import of pyworker: parallel_config(backend="pyworker") and
    GridSearchCV(n_jobs=-1) over a dataset that ships with scikit-learn; its 60 fits ran on
    several worker pods, and it found what the same search in the Lab pod alone finds."""
    kernel = imagelib.Kernel(demo["base"], demo["token"])
    try:
        r = kernel.execute(GRID_SEARCH, timeout_s=300)
    finally:
        kernel.close()
    assert r["status"] == "ok", r
    out = last_json(r["stdout"])
    pods = {_host_hash(p): p for p in k8s.worker_pods(demo["ns"], demo["release"])}
    hosts = [pods.get(h, f"not a worker: {h}") for h in out["hosts"]]
    assert set(hosts) <= set(pods.values()), (hosts, sorted(pods.values()))
    assert out["lab"] not in out["hosts"], "a fit ran in the Lab pod"
    assert len(hosts) >= 3, f"GridSearchCV's fits ran on only {len(hosts)} pods: {hosts}"
    assert out["par"] == out["seq"], "the search on the workers found something else"
    print(f"GridSearchCV(n_jobs=-1): 60 fits on {len(hosts)} distinct pods")


def test_seed_demo_in_headless_chromium(k8s, demo):
    """Open the printed URL with the token in Chromium, create a notebook from the launcher, run a
    cell with pmap and read its output from the page. The screenshot is kept (build/e2e-artifacts)."""
    why = browser.missing()
    if why:
        if os.environ.get("PYWORKER_REQUIRE_ALL") == "1":
            pytest.fail(why)
        pytest.skip(why)
    code = ("import socket, time; hosts = pmap(lambda i: (time.sleep(0.5), socket.gethostname())[1], "
            "range(40)); print('BROWSER-RESULT', len(hosts), len(set(hosts)), ' '.join(sorted(set(hosts))))")
    text, shot = browser.run_cell_in_new_notebook(demo["base"], demo["token"], code, "BROWSER-RESULT",
                                                  "seed-demo-chromium", timeout_s=180)
    assert shot.is_file() and shot.stat().st_size > 10_000, shot
    m = re.search(r"BROWSER-RESULT (\d+) (\d+) (.*)", text)
    assert m, text
    n, distinct, hosts = int(m[1]), int(m[2]), set(m[3].split())
    assert n == 40
    workers = set(k8s.worker_pods(demo["ns"], demo["release"]))
    assert hosts <= workers, (hosts, workers)
    assert distinct >= 5, f"only {distinct} distinct workers answered the browser's cell: {hosts}"
