"""Mutual TLS on the KV plane, over real gRPC on loopback with a tiny model: a transfer between
certified peers moves the KV exactly; a plaintext peer, a peer without a client certificate, one
certified by another CA, and a server whose certificate names another host are refused, each with
an error that says why, and nothing is reserved; the workers wire it (and their own KV addresses)
from their arguments; configuration errors name the field. Certificates are made here."""

import asyncio
import datetime
import ipaddress
import os
import threading
from types import SimpleNamespace

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import assert_no_leaks
from helpers import free_port, make_tiny_model
from splitserve.engine.kv_port import EngineKVPort
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import TransferFailedError
from splitserve.kvtransfer import kvtransfer_pb2 as pb
from splitserve.kvtransfer import kvtransfer_pb2_grpc as pb_grpc
from splitserve.kvtransfer.client import KVSender
from splitserve.kvtransfer.endpoint import advertised_host, checked_port, join_host_port
from splitserve.kvtransfer.server import KVTransferServicer, start_server
from splitserve.kvtransfer.tls import KVTLS
from splitserve.kvtransfer.wire import TOKEN_METADATA_KEY, fingerprint
from splitserve.platform.config import ServeConfig
from test_kvtransfer import TOKEN, decode_all, make_engine, prefill

SERVER_NAME = "splitserve-kv"  # the DNS name every worker certificate carries, for kv_tls.server_name


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tls")
    make_tiny_model(str(path), "llama", max_position_embeddings=512)
    return str(path)


# ---- certificates -------------------------------------------------------------------------------------

def _cert(subject: str, key, issuer=None, issuer_key=None, ca=False, ips=(), dns=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:  # a worker's certificate serves both ends: its KV server and its senders
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                               ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        sans = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips] + [x509.DNSName(d) for d in dns]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


class CA:
    """A certificate authority writing PEM files into ``folder``."""

    def __init__(self, folder, name: str):
        self.folder, self.name = folder, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = _cert(name, self.key, ca=True)
        self.path = self._write(f"{name}-ca.crt", self.cert.public_bytes(serialization.Encoding.PEM))

    def _write(self, file: str, data: bytes) -> str:
        path = os.path.join(self.folder, file)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def issue(self, subject: str, ips=(), dns=(), trust=None, server_name=None) -> KVTLS:
        """A worker's KVTLS: a certificate signed here, trusting ``trust`` (a CA; default this one)."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(subject, key, self.cert, self.key, ips=ips, dns=dns)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return KVTLS(cert=self._write(f"{subject}.crt", cert.public_bytes(serialization.Encoding.PEM)),
                     key=self._write(f"{subject}.key", key_pem), ca=(trust or self).path, server_name=server_name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pki"))
    ca, other = CA(folder, "cluster"), CA(folder, "other")
    return SimpleNamespace(
        folder=folder, ca=ca, other=other,
        by_ip=ca.issue("worker-ip", ips=["127.0.0.1"]),  # checked against the dialled 127.0.0.1
        by_name=ca.issue("worker-name", dns=[SERVER_NAME], server_name=SERVER_NAME),  # no IP SAN at all
        name_unset=ca.issue("worker-name-unset", dns=[SERVER_NAME]),  # the same, without server_name
        intruder=other.issue("intruder", ips=["127.0.0.1"], trust=ca),  # trusts our servers, signed by other
        distrustful=ca.issue("distrustful", ips=["127.0.0.1"], trust=other))  # ours, trusts only the other CA


# ---- a TLS KV server over a decode engine ---------------------------------------------------------------

class TLSHarness:
    """A decode engine behind a real gRPC KV server (mutual TLS if ``tls``) on loopback."""

    def __init__(self, engine, tls):
        self.engine, self.tls = engine, tls
        self.servicer = KVTransferServicer(EngineKVPort(engine, threading.Lock()), TOKEN)
        self.senders = []

    def sender(self, tls, token=TOKEN) -> KVSender:
        self.senders.append(KVSender(token, tls=tls, timeout_s=5.0))
        return self.senders[-1]

    async def __aenter__(self):
        self.server, port = await start_server(self.servicer, "127.0.0.1", 0, tls=self.tls)
        self.address = f"127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc):
        for s in self.senders:
            await s.close()
        await self.server.stop(None)


def handoff(p_eng, sender, address, prompt, params, rid="r1"):
    """Prefill here, reserve and send there; returns (first output, held block ids) or raises."""
    async def run():
        first = prefill(p_eng, prompt, params, rid=rid)
        table = list(p_eng.kv.block_table(rid))
        try:
            await sender.reserve(address, rid, first.num_prompt_tokens, fingerprint(p_eng.model_config,
                                                                                   p_eng.kv_spec))
            await sender.send(address, EngineKVPort(p_eng, threading.Lock()), rid)
        finally:
            p_eng.release(rid)
        return first, table
    return run()


@pytest.mark.parametrize("which", ["by_ip", "by_name"])
def test_a_transfer_between_certified_peers_moves_the_kv_exactly(tiny_path, pki, which):
    """Certificates checked by IP SAN, or by the configured server name (no IP SAN): the decode side
    holds exactly the prefill side's KV bytes, and decoding goes on from them."""
    tls = getattr(pki, which)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompt = "a prompt that fills several blocks of four tokens"
    reference = make_engine(tiny_path).generate([prompt], params)[0]
    p_eng, d_eng = make_engine(tiny_path), make_engine(tiny_path)

    async def run():
        async with TLSHarness(d_eng, tls) as h:
            sender = h.sender(tls)
            first, src_table = await handoff(p_eng, sender, h.address, prompt, params)
            src = p_eng.kv_cache[:, torch.tensor(src_table)]  # [L, n, 2, bs, Hkv, D]
            dst = d_eng.kv_cache[:, torch.tensor(d_eng.kv.block_table("r1"))]
            assert torch.equal(src, dst)
            assert sender.num_bytes_sent == len(src_table) * p_eng.kv_spec.bytes_per_block
            return first

    first = asyncio.run(run())
    tokens = first.new_token_ids + [t for o in decode_all(d_eng) for t in o.new_token_ids]
    assert tokens == reference.token_ids
    assert_no_leaks(p_eng)
    assert_no_leaks(d_eng)


def test_peers_without_a_cluster_certificate_are_refused(tiny_path, pki):
    """Each refused in the handshake, before any call: nothing is reserved, and the sender's error says
    why. The same server serves a certified sender right after; the cluster token is still checked."""
    d_eng, p_eng = make_engine(tiny_path), make_engine(tiny_path)
    layout = fingerprint(p_eng.model_config, p_eng.kv_spec)

    async def refused(sender, address, match):
        with pytest.raises(TransferFailedError, match=match) as info:
            await sender.reserve(address, "r1", 20, layout)
        assert info.value.code == "UNAVAILABLE"

    async def run():
        async with TLSHarness(d_eng, pki.by_ip) as h:
            await refused(h.sender(None), h.address, "refuses plaintext senders")
            await refused(h.sender(pki.intruder), h.address, "refuses this worker's certificate")
            await refused(h.sender(pki.distrustful), h.address, "not signed by the CA in this worker's kv_tls.ca")
            # a TLS client with no certificate of its own (not something KVSender can be): the handshake fails
            with open(pki.ca.path, "rb") as f:
                anonymous = grpc.aio.secure_channel(h.address, grpc.ssl_channel_credentials(f.read()))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.KVTransferStub(anonymous).Reserve(
                    pb.ReserveRequest(request_id="r1", num_tokens=20, layout=layout),
                    metadata=((TOKEN_METADATA_KEY, TOKEN),), timeout=5)
            await anonymous.close()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert h.servicer._reservations == {} and d_eng.kv.num_free_blocks == d_eng.kv.num_blocks
            # certified, wrong cluster token: past TLS, refused by the token check
            with pytest.raises(TransferFailedError, match="UNAUTHENTICATED"):
                await h.sender(pki.by_ip, token="wrong").reserve(h.address, "r1", 20, layout)
            good = h.sender(pki.by_ip)
            assert (await good.reserve(h.address, "r1", 20, layout)).num_blocks == 5
            assert await good.release(h.address, "r1")
        # a server whose certificate names no dialled IP, and no server_name set: the sender refuses it
        async with TLSHarness(d_eng, pki.by_name) as h:
            await refused(h.sender(pki.name_unset), h.address, "set kv_tls.server_name")
        # a TLS sender, a plaintext server
        async with TLSHarness(d_eng, None) as h:
            await refused(h.sender(pki.by_ip), h.address, "the KV server speaks plaintext")

    asyncio.run(run())
    assert_no_leaks(d_eng)


def test_workers_serve_and_send_over_tls_and_advertise_their_own_address(tiny_path, pki, monkeypatch):
    """A decode worker bound to every interface advertises the node IP Ray reports (here a loopback
    alias), on a fixed port; a TLS prefill worker hands a request to it and the tokens are exact; a
    plaintext prefill worker is refused (``decode_failed``: the router tries another); a second worker
    on the same fixed port fails to start, saying why."""
    from splitserve.decode import worker as decode_worker
    from splitserve.decode.worker import DecodeWorkerImpl
    from splitserve.prefill.worker import PrefillWorkerImpl

    kw = dict(model=tiny_path, dtype="float32", show_progress=False, block_size=4, num_kv_blocks=64,
              spec_calibrate=False)
    prompt, params = list(range(5, 40)), {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    expected = make_engine(tiny_path).generate([prompt], SamplingParams(**params))[0].token_ids
    monkeypatch.setattr(decode_worker, "ray_node_ip", lambda: "127.0.0.2")
    monkeypatch.delenv("SPLITSERVE_KV_ADVERTISE_HOST", raising=False)
    fixed = free_port()

    async def run():
        d = DecodeWorkerImpl(kw, TOKEN, kv_host="0.0.0.0", kv_port=fixed, kv_tls=pki.by_name)
        p_tls = PrefillWorkerImpl(kw, TOKEN, kv_tls=pki.by_name)
        p_plain = PrefillWorkerImpl(kw, TOKEN)
        twin = DecodeWorkerImpl(kw, TOKEN, kv_host="0.0.0.0", kv_port=fixed, kv_tls=pki.by_name, name="twin")
        try:
            identity = await d.start()
            assert identity["address"] == f"127.0.0.2:{fixed}"
            with pytest.raises(OSError, match=f"cannot listen on 0.0.0.0:{fixed}.*only one decode worker fits"):
                await twin.start()
            refused = await p_plain.prefill("r0", prompt, params, d.address)
            assert refused["status"] == "decode_failed" and "refuses plaintext senders" in refused["error"]
            result = await p_tls.prefill("r1", prompt, params, d.address)
            assert result["status"] == "transferred", result
            tokens = result["first"].new_token_ids + [t async for o in d.stream("r1") for t in o.new_token_ids]
            assert tokens == expected
            await asyncio.sleep(0.05)
            assert not any(d.leaks().values()), d.leaks()
            assert_no_leaks(p_tls.engine)
            assert_no_leaks(p_plain.engine)
        finally:
            for w in (d, p_tls, p_plain, twin):
                await w.stop()

    asyncio.run(run())


def test_advertised_address_is_the_workers_own():
    """Bound to one address: that address (the default 127.0.0.1: one machine); bound to every interface:
    the node IP Ray reports, 127.0.0.1 outside Ray; a per-node override wins; IPv6 in brackets."""
    assert advertised_host("127.0.0.1", "10.0.0.7") == "127.0.0.1"
    assert advertised_host("10.0.0.9", "10.0.0.7") == "10.0.0.9"
    assert advertised_host("0.0.0.0", "10.0.0.7") == "10.0.0.7"
    assert advertised_host("0.0.0.0", "10.0.0.8") == "10.0.0.8"  # each worker its own node, not one for all
    assert advertised_host("::", "fd00::5") == "fd00::5"
    assert advertised_host("0.0.0.0", None) == "127.0.0.1"
    assert advertised_host("0.0.0.0", "10.0.0.7", override="10.1.2.3") == "10.1.2.3"
    assert join_host_port("10.0.0.7", 5) == "10.0.0.7:5"
    assert join_host_port("fd00::5", 5) == "[fd00::5]:5"
    assert join_host_port("kv.example", 5) == "kv.example:5"
    assert checked_port("7000") == 7000
    for bad in (-1, 70000, "x", True):
        with pytest.raises(ValueError, match="kv_port must be a port number 0..65535"):
            checked_port(bad)


def test_configuration_errors_name_the_field(pki, monkeypatch, tmp_path):
    for var in ("CERT", "KEY", "CA", "SERVER_NAME"):
        monkeypatch.delenv(f"SPLITSERVE_KV_TLS_{var}", raising=False)
    monkeypatch.delenv("SPLITSERVE_KV_PORT", raising=False)
    good = {"cert": pki.by_ip.cert, "key": pki.by_ip.key, "ca": pki.ca.path}
    assert ServeConfig().kv_tls is None and ServeConfig().kv_port == 0  # off by default
    cfg = ServeConfig.from_dict({"kv_tls": {**good, "server_name": SERVER_NAME}, "kv_port": 7000})
    assert cfg.kv_tls == KVTLS(**good, server_name=SERVER_NAME) and cfg.kv_port == 7000

    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    cases = [
        ({"cert": good["cert"], "key": good["key"]}, r"needs cert, key and ca .* missing: \['ca'\]"),
        ({**good, "pasword": "x"},
         r"kv_tls: unknown keys \['pasword'\]; allowed: \['cert', 'key', 'ca', 'server_name'\]"),
        ({**good, "ca": str(tmp_path / "nope.crt")}, r"kv_tls.ca: cannot read .*nope.crt.*No such file"),
        ({**good, "key": str(tmp_path)}, r"kv_tls.key: cannot read .*Is a directory"),
        ({**good, "key": good["cert"]}, r"kv_tls.key: .* holds no PEM private key"),
        ({**good, "cert": str(not_pem)}, r"kv_tls.cert: .*not.pem' holds no PEM certificate"),
        ({**good, "server_name": " "}, r"kv_tls.server_name must be a host name"),
        ("on", r"kv_tls must be a mapping \{cert, key, ca, server_name\} or null"),
    ]
    for raw, match in cases:
        with pytest.raises(ValueError, match=match):
            ServeConfig(kv_tls=raw)

    # the environment (a Kubernetes Secret mounted as files): all three or none
    monkeypatch.setenv("SPLITSERVE_KV_TLS_CERT", good["cert"])
    monkeypatch.setenv("SPLITSERVE_KV_TLS_KEY", good["key"])
    with pytest.raises(ValueError, match=r"missing: \['SPLITSERVE_KV_TLS_CA'\]"):
        ServeConfig()
    monkeypatch.setenv("SPLITSERVE_KV_TLS_CA", good["ca"])
    monkeypatch.setenv("SPLITSERVE_KV_PORT", "7001")
    assert ServeConfig().kv_tls == KVTLS(**good) and ServeConfig().kv_port == 7001
    assert ServeConfig(kv_tls=None).kv_tls is None  # `kv_tls: null` in the YAML turns it off
    monkeypatch.setenv("SPLITSERVE_KV_PORT", "http")
    with pytest.raises(ValueError, match="SPLITSERVE_KV_PORT must be a port number"):
        ServeConfig()
