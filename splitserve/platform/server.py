"""Starting and stopping a whole splitserve server: Ray, the pools, Ray Serve and the front door.

    server = start_server(cfg)      # ray.init (local, or cfg address) -> controller + pools -> serve.start -> serve.run
    server.endpoints                # {"http": "http://127.0.0.1:8000", "grpc": "127.0.0.1:9000"}
    server.shutdown()               # front door, pools, Serve, and the Ray it started

Serve's gRPC proxy registers each servicer function with a stand-in servicer whose every method is
routed to the front door's method of the same name: the KServe service (``ModelInfer``, ...) and
the standard ``grpc.health.v1.Health`` (``Check``, ``Watch``). Server reflection is Serve's own
(``gRPCOptions.enable_reflection``): it runs in the proxy, from the descriptors the servicer
modules registered there, and lists both services and itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from splitserve.platform.config import ServeConfig
from splitserve.platform.pools import Pools

APP_NAME = "splitserve"
SERVICER = "splitserve.platform.grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"
HEALTH_SERVICER = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"  # grpcio-health-checking


@dataclass
class RunningServer:
    cfg: ServeConfig
    pools: Pools
    started_ray: bool
    dashboard_url: str | None = None

    @property
    def endpoints(self) -> dict:
        return {"http": f"http://{self.cfg.http_host}:{self.cfg.http_port}",
                "openai": f"http://{self.cfg.http_host}:{self.cfg.http_port}/v1",
                "grpc": f"{self.cfg.http_host}:{self.cfg.grpc_port}",
                "model": self.cfg.model_name,
                "dashboard": self.dashboard_url}

    def shutdown(self) -> None:
        try:
            serve.shutdown()
        finally:
            self.pools.shutdown()
            if self.started_ray:
                ray.shutdown(wait_for_processes=True)  # gone before a next server starts one (tests, restarts)


def init_ray(address: str | None, num_cpus: int | None, log=lambda m: None, dashboard: bool = True):
    """``ray.init``, tried twice when Ray fails to start a local node: its dashboard process sometimes
    dies before writing any log, or its raylet misses the start-up deadline (both seen in full
    test-suite runs, right after another Ray had stopped)."""
    for attempt in (1, 2):
        try:
            # an explicit "local": a bare ray.init() would join any cluster `ray start` left on the machine
            return ray.init(address=address or "local", num_cpus=num_cpus if address is None else None,
                            include_dashboard=dashboard if address is None else None, log_to_driver=False)
        except Exception as e:
            if address is not None or attempt == 2:
                raise
            log(f"Ray did not start ({str(e).splitlines()[0][:200]}); trying once more")
            ray.shutdown(wait_for_processes=True)


def start_server(cfg: ServeConfig, address: str | None = None, num_cpus: int | None = None,
                 log=print) -> RunningServer:
    started_ray, dashboard = False, None
    if not ray.is_initialized():
        ctx = init_ray(address, num_cpus, log)
        dashboard = f"http://{ctx.dashboard_url}" if getattr(ctx, "dashboard_url", None) else None
        started_ray = True
    log(f"starting pools ({cfg.mode}) ...")
    pools = Pools(cfg).start()
    try:
        # proxies on the head only: a proxy on every node would keep a worker node busy forever, so
        # Ray's autoscaler could never take back a node whose worker the autoscaler drained
        serve.start(proxy_location="HeadOnly", http_options={"host": cfg.http_host, "port": cfg.http_port},
                    grpc_options=gRPCOptions(port=cfg.grpc_port, grpc_servicer_functions=[SERVICER, HEALTH_SERVICER],
                                             enable_reflection=True))
        from splitserve.platform.auth import ApiKeys
        from splitserve.platform.frontdoor import FrontDoor
        serve.run(FrontDoor.bind(pools.handles(), cfg.model_name, cfg.model, ApiKeys(cfg.api_keys)),
                  name=APP_NAME, route_prefix="/")
    except BaseException:
        pools.shutdown()
        if started_ray:
            ray.shutdown(wait_for_processes=True)
        raise
    return RunningServer(cfg, pools, started_ray, dashboard)
