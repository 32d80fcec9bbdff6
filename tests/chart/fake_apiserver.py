"""A tiny stand-in for the Kubernetes API server, enough for `helm template --dry-run=server`:
version and discovery for the kinds the chart renders, GET of the objects it holds, 404 for the
rest. It lets the tests run the chart's `lookup` against an existing Secret (the `helm upgrade`
path) without a cluster. Listens on 127.0.0.1 on a free port; read-only."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# group/version -> [(resource, kind)] of what the chart renders.
RESOURCES = {
    "v1": [("secrets", "Secret"), ("configmaps", "ConfigMap"), ("services", "Service"),
           ("pods", "Pod"), ("persistentvolumeclaims", "PersistentVolumeClaim"),
           ("serviceaccounts", "ServiceAccount")],
    "rbac.authorization.k8s.io/v1": [("roles", "Role"), ("rolebindings", "RoleBinding")],
    "apps/v1": [("deployments", "Deployment")],
    # KEDA's, so that Helm 3 sees a cluster where autoscaling.enabled can install (NOTES tests).
    "keda.sh/v1alpha1": [("scaledobjects", "ScaledObject")],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget")],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy"), ("ingresses", "Ingress")],
}
NOT_FOUND = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}


def _resource_list(gv):
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": [
        {"name": r, "singularName": k.lower(), "namespaced": True, "kind": k, "verbs": ["get", "list"]}
        for r, k in RESOURCES[gv]]}


class FakeAPIServer:
    """Serves ``objects``: {(group/version, resource, namespace, name): object dict}."""

    def __init__(self, objects, kube_version=(1, 34)):
        self.objects = objects
        self.requests = []
        routes = {
            "/version": {"major": str(kube_version[0]), "minor": str(kube_version[1]),
                         "gitVersion": "v%d.%d.0" % kube_version, "platform": "linux/amd64"},
            "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]},
            "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
                 "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}}
                for gv in RESOURCES if "/" in gv]},
        }
        for gv in RESOURCES:
            routes[("/api/" if gv == "v1" else "/apis/") + gv] = _resource_list(gv)
        for (gv, resource, ns, name), obj in objects.items():
            routes[f"{'/api/' if gv == 'v1' else '/apis/'}{gv}/namespaces/{ns}/{resource}/{name}"] = obj
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?", 1)[0]
                server.requests.append(path)
                body = routes.get(path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(body if body is not None else NOT_FOUND).encode())

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def kubeconfig(self, path, namespace):
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "namespace": namespace,
                                                      "user": "fake"}}],
            "users": [{"name": "fake", "user": {}}],
        }))
        return path

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
