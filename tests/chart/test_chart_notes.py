"""NOTES.txt tells the user what to do next, for each way JupyterLab is exposed."""
import pytest

TOKEN_CMD = ("kubectl --namespace ns get secret par-pyworker -o jsonpath='{.data.lab-token}' "
             "| base64 -d; echo")
PMAP = "   pmap(lambda x: x * x, range(10))"
PMAP_CLIENT = "from pyworker import pmap; print(pmap(lambda x: x * x, range(10)))"


def common(notes, workers="2 workers"):
    assert TOKEN_CMD in notes
    assert PMAP in notes
    assert f"{workers} (Deployment par-pyworker-worker)" in notes
    assert "helm test par --namespace ns\n" in notes
    assert "kubectl --namespace ns logs par-pyworker-test-pmap" in notes


def test_clusterip_port_forward(helm):
    notes = helm.notes()
    common(notes)
    assert "kubectl --namespace ns port-forward service/par-pyworker-lab 8888:80" in notes
    assert "http://127.0.0.1:8888/lab" in notes
    assert "nodePort" not in notes and "loadBalancer" not in notes


def test_clusterip_other_port(helm):
    notes = helm.notes("--set", "lab.service.port=8080", "--set", "workers=1")
    common(notes, "1 worker")
    assert "port-forward service/par-pyworker-lab 8888:8080" in notes


def test_nodeport(helm):
    notes = helm.notes("--set", "lab.service.type=NodePort", "--set", "workers=7")
    common(notes, "7 workers")
    assert ("kubectl --namespace ns get service par-pyworker-lab -o jsonpath='{.spec.ports[0].nodePort}'"
            in notes)
    assert 'echo "http://$NODE_IP:$NODE_PORT/lab"' in notes
    assert "port-forward service/" not in notes  # (the plain-HTTP warning names port-forward)


def test_nodeport_fixed(helm):
    notes = helm.notes("--set", "lab.service.type=NodePort", "--set", "lab.service.nodePort=30888")
    assert "http://NODE_IP:30888/lab" in notes


@pytest.mark.parametrize("port, url", [(80, 'echo "http://$LB/lab"'), (8080, 'echo "http://$LB:8080/lab"')])
def test_loadbalancer(helm, port, url):
    notes = helm.notes("--set", "lab.service.type=LoadBalancer", "--set", f"lab.service.port={port}")
    common(notes)
    assert "{.status.loadBalancer.ingress[0].ip}{.status.loadBalancer.ingress[0].hostname}" in notes
    assert url in notes
    assert "port-forward service/" not in notes  # (the plain-HTTP warning names port-forward)


def test_ingress_with_host_and_tls(helm):
    notes = helm.notes("--set", "lab.ingress.enabled=true", "--set", "lab.ingress.host=lab.example.com",
                       "--set", "lab.ingress.tls.secretName=tls")
    common(notes)
    assert "https://lab.example.com/lab" in notes
    assert "port-forward service/" not in notes  # (the plain-HTTP warning names port-forward)


def test_ingress_without_host(helm):
    notes = helm.notes("--set", "lab.ingress.enabled=true")
    common(notes)
    assert "kubectl --namespace ns get ingress par-pyworker-lab" in notes
    assert "http://ADDRESS/lab" in notes


def test_no_lab(helm):
    notes = helm.notes("--set", "lab.enabled=false", "--set", "workers=4")
    assert "4 workers (Deployment par-pyworker-worker)" in notes
    assert "PYWORKER_REDIS_URL        redis://par-pyworker-redis:6379/0" in notes
    assert "key redis-password of Secret par-pyworker" in notes
    assert "app.kubernetes.io/instance: par" in notes  # the NetworkPolicy admits only labelled pods
    assert PMAP_CLIENT in notes
    assert "lab-token" not in notes and "port-forward" not in notes


PLAIN_HTTP = "WARNING: JupyterLab is served over plain HTTP"


@pytest.mark.parametrize("args, why", [
    (["--set", "lab.service.type=NodePort"], "(lab.service.type=NodePort)"),
    (["--set", "lab.service.type=LoadBalancer"], "(lab.service.type=LoadBalancer)"),
    (["--set", "lab.ingress.enabled=true"], "(an Ingress without lab.ingress.tls.secretName)"),
    (["--set", "lab.ingress.enabled=true", "--set", "lab.ingress.host=lab.example.com"],
     "(an Ingress without lab.ingress.tls.secretName)"),
    (["--set", "lab.ingress.enabled=true", "--set", "lab.service.type=NodePort"],
     "(lab.service.type=NodePort; an Ingress without lab.ingress.tls.secretName)"),
])
def test_plain_http_warns(helm, args, why):
    notes = helm.notes(*args)
    assert f"{PLAIN_HTTP} {why}." in notes
    assert "the login token, code and data cross the network in the clear" in notes.replace("\n   ", " ").lower()
    assert "lab.ingress.tls.secretName" in notes and "kubectl port-forward" in notes


@pytest.mark.parametrize("args", [
    [],  # ClusterIP: kubectl port-forward, through the API server's TLS
    ["--set", "lab.ingress.enabled=true", "--set", "lab.ingress.tls.secretName=tls"],
    ["--set", "lab.enabled=false", "--set", "lab.service.type=NodePort"],  # no Lab, no token
])
def test_no_warning_without_plain_http(helm, args):
    assert "WARNING" not in helm.notes(*args)


def test_autoscaled_notes_give_the_range_and_how_to_change_it(helm3):
    """Helm 3 only: its dry run asks the (fake) API server, which knows KEDA's ScaledObject."""
    notes = helm3.notes("--set", "autoscaling.enabled=true", "--set", "autoscaling.maxWorkers=6", "--set", "workers=9")
    common(notes, "0 to 6 workers, scaled by KEDA on the tasks queued and running")
    assert "--reuse-values --set autoscaling.maxWorkers=N" in notes
    assert "9 worker" not in notes and "--set workers=N" not in notes
