"""The module fetcher under abuse (issue #15): SSRF after DNS and on every redirect, deadlines that
bound the whole transfer, bounded unboxing (a real gzip quine, a gzip bomb), and file:// confinement.

Only loopback ever receives traffic: non-loopback addresses appear only where the guard refuses them
before any socket exists, and the "after DNS" / "redirect" cases block loopback ranges through
BLOCKED_CIDRS_IN_WASM_FETCH.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_testsupport import FaultProxy, ModuleServer, Registry, tiny_wasm, wasm_to_oci_image
from hostile_archives import gzip_bomb, gzip_quine, nested_gzip

from wasmesh.agent.agentcmd import build_options
from wasmesh.agent.cache import ModuleCache
from wasmesh.agent.errors import FetchError
from wasmesh.agent.metrics import AgentMetrics
from wasmesh.agent.options import CacheOptions
from wasmesh.agent.ssrf import BLOCKED_CIDRS_ENV, AddressPolicy, parse_blocked_cidrs
from wasmesh.agent.unbox import MAX_ARCHIVE_LAYERS, unbox_if_possible
from wasmesh.cli import build_parser, main
from wasmesh.proxy.cli import build_xds_options
from wasmesh.proxy.config import CacheConfig, PluginResource, parse_config
from wasmesh.proxy.plugins import PluginChainError, WasmChainBuilder, parse_resources

PushImage = Callable[..., str]
LOOPBACK_V4_AND_V6 = "127.0.0.0/8,::1/128"


def make_cache(directory: Path, **overrides: Any) -> ModuleCache:
    options = CacheOptions(dir=directory, http_initial_backoff_s=0.001, **overrides)
    return ModuleCache(options, AgentMetrics())


def fetch_error(cache: ModuleCache, url: str, **kwargs: Any) -> FetchError:
    with pytest.raises(FetchError) as caught:
        cache.get_sync(url, **kwargs)
    return caught.value


@pytest.fixture
def no_blocked_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BLOCKED_CIDRS_ENV, raising=False)


# ------------------------------------------------------------------------------------ the policy


def test_always_blocked_ranges_and_istio_defaults() -> None:
    policy = AddressPolicy()
    assert policy.refusal("169.254.169.254") == "169.254.169.254 is link-local (169.254.0.0/16)"
    assert policy.refusal("fe80::1") == "fe80::1 is link-local (fe80::/10)"
    assert policy.refusal("fd00:ec2::254") == (
        "fd00:ec2::254 is a known cloud metadata address (fd00:ec2::/32)"
    )
    assert policy.refusal("100.100.100.200") == (
        "100.100.100.200 is a known cloud metadata address (100.100.100.200/32)"
    )
    # An IPv4-mapped IPv6 address is judged as the IPv4 address it carries.
    assert policy.refusal("::ffff:169.254.169.254") == "169.254.169.254 is link-local (169.254.0.0/16)"
    # Loopback, private and ULA space stay allowed by default (in-cluster registries live there).
    for allowed in ("127.0.0.1", "::1", "10.0.0.1", "192.168.1.1", "100.100.100.199", "fd12::1"):
        assert policy.refusal(allowed) is None
    extra = AddressPolicy(parse_blocked_cidrs(" 10.0.0.0/8, 192.168.1.7 ,"))
    assert extra.refusal("10.1.2.3") == (
        "10.1.2.3 is in blocked CIDR range 10.0.0.0/8 (BLOCKED_CIDRS_IN_WASM_FETCH)"
    )
    assert extra.refusal("192.168.1.7") == (
        "192.168.1.7 is in blocked CIDR range 192.168.1.7/32 (BLOCKED_CIDRS_IN_WASM_FETCH)"
    )
    with pytest.raises(ValueError) as caught:
        parse_blocked_cidrs("10.0.0.0/8,nope")
    assert str(caught.value) == (
        "BLOCKED_CIDRS_IN_WASM_FETCH: invalid CIDR 'nope' (examples: 10.0.0.0/8, fd00::/8)"
    )


def test_agent_pull_and_proxy_read_the_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    args = build_parser().parse_args(
        ["agent", "--xds", "127.0.0.1:15010", "--plaintext", "--cache-dir", str(tmp_path)]
    )
    assert build_options(args, {BLOCKED_CIDRS_ENV: "10.0.0.0/8,fd00::/8"}).cache.blocked_cidrs == blocked
    assert build_options(args, {}).cache.blocked_cidrs == ()
    with pytest.raises(ValueError) as caught:
        build_options(args, {BLOCKED_CIDRS_ENV: "10.0.0.300/8"})
    assert str(caught.value).startswith("BLOCKED_CIDRS_IN_WASM_FETCH: invalid CIDR '10.0.0.300/8'")
    # The proxy builds its module cache from CacheOptions(), which reads the process environment.
    monkeypatch.setenv(BLOCKED_CIDRS_ENV, "10.0.0.0/8,fd00::/8")
    bare = build_parser().parse_args(
        ["proxy", "--xds", "127.0.0.1:15010", "--plaintext", "--node-id", "web-1"]
    )
    proxy_cache = build_xds_options(bare, {}).proxy().builder.module_cache()
    assert proxy_cache.options.blocked_cidrs == blocked


# ------------------------------------------------------------------------------- refused targets


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/x.wasm", "169.254.169.254 is link-local (169.254.0.0/16)"),
        ("http://[fd00:ec2::254]/x.wasm", "fd00:ec2::254 is a known cloud metadata address (fd00:ec2::/32)"),
        ("http://[fe80::1]:8080/x.wasm", "fe80::1 is link-local (fe80::/10)"),
        ("http://100.100.100.200/x.wasm",
         "100.100.100.200 is a known cloud metadata address (100.100.100.200/32)"),
        ("https://[::ffff:169.254.169.254]/x.wasm", "169.254.169.254 is link-local (169.254.0.0/16)"),
    ],
)  # fmt: skip
def test_http_to_metadata_addresses_is_refused_without_retry(
    url: str, reason: str, tmp_path: Path, no_blocked_env: None
) -> None:
    cache = make_cache(tmp_path)
    error = fetch_error(cache, url)
    assert error.message == (
        f'wasm module download failed after 1 attempts, last error: Get "{url}": connection blocked: {reason}'
    )
    assert cache.metrics.remote_fetch_count.value("download_failure") == 1


@pytest.mark.parametrize(
    ("reference", "base", "reason"),
    [
        ("oci://[fd00:ec2::254]:5000/repo:tag", "https://[fd00:ec2::254]:5000",
         "fd00:ec2::254 is a known cloud metadata address (fd00:ec2::/32)"),
        ("oci://169.254.169.254/wasm/plugin:v1", "https://169.254.169.254",
         "169.254.169.254 is link-local (169.254.0.0/16)"),
    ],
)  # fmt: skip
def test_oci_registry_on_a_metadata_address_is_refused(
    reference: str, base: str, reason: str, tmp_path: Path, no_blocked_env: None
) -> None:
    cache = make_cache(tmp_path)
    repository, tag = reference.split("/", 3)[3].split(":")
    error = fetch_error(cache, reference)
    assert error.message == (
        f'could not fetch Wasm OCI image: could not fetch manifest: Get "{base}/v2/{repository}/manifests/'
        f'{tag}": connection blocked: {reason}'
    )
    assert cache.metrics.remote_fetch_count.value("manifest_failure") == 1


def test_ipv6_literal_urls_reach_the_address_they_name(tmp_path: Path, no_blocked_env: None) -> None:
    server = ModuleServer("::1")
    try:
        wasm = tiny_wasm("over-ipv6")
        url = server.serve("/v6.wasm", wasm)
        assert url == f"http://[::1]:{server.port}/v6.wasm"
        assert make_cache(tmp_path).get_sync(url).read_bytes() == wasm
        assert server.count("/v6.wasm") == 1
    finally:
        server.stop()


def test_a_name_is_checked_after_dns_and_refused_before_connecting(
    module_server: ModuleServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module_server.serve("/m.wasm", tiny_wasm("never-served"))
    url = f"http://localhost:{module_server.port}/m.wasm"
    monkeypatch.setenv(BLOCKED_CIDRS_ENV, LOOPBACK_V4_AND_V6)
    cache = make_cache(tmp_path)  # reads the variable, as the agent, pull and proxy do
    error = fetch_error(cache, url)
    assert error.message.startswith(
        f'wasm module download failed after 1 attempts, last error: Get "{url}": connection blocked: '
        "localhost resolved to "
    )
    assert error.message.endswith("(BLOCKED_CIDRS_IN_WASM_FETCH)")
    assert module_server.count("/m.wasm") == 0  # nothing ever connected
    assert cache.metrics.remote_fetch_count.value("download_failure") == 1


def test_pull_refuses_a_blocked_name_with_one_line(module_server: ModuleServer, tmp_path: Path) -> None:
    module_server.serve("/m.wasm", tiny_wasm("never-pulled"))
    url = f"http://localhost:{module_server.port}/m.wasm"
    env = {**os.environ, BLOCKED_CIDRS_ENV: "127.0.0.0/8", "PYTHONPATH": os.getcwd()}
    # localhost may also resolve to ::1, which this list allows: one refused address refuses the name.
    result = run_wasmesh(["pull", url, "-o", str(tmp_path / "out.wasm"), "--cache-dir", str(tmp_path)], env)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f'error: wasm module download failed after 1 attempts, last error: Get "{url}": connection '
        "blocked: localhost resolved to 127.0.0.1 is in blocked CIDR range 127.0.0.0/8 "
        "(BLOCKED_CIDRS_IN_WASM_FETCH)"
    ]
    assert module_server.count("/m.wasm") == 0
    env[BLOCKED_CIDRS_ENV] = "127.0.0.0/8,not-a-cidr"
    result = run_wasmesh(["pull", url, "-o", str(tmp_path / "out.wasm")], env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: BLOCKED_CIDRS_IN_WASM_FETCH: invalid CIDR 'not-a-cidr' (examples: 10.0.0.0/8, fd00::/8)"
    ]


@pytest.fixture
def blocked_loopback_server() -> Iterator[ModuleServer]:
    server = ModuleServer("127.0.0.2")
    yield server
    server.stop()


def test_every_redirect_is_checked(
    module_server: ModuleServer,
    blocked_loopback_server: ModuleServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = blocked_loopback_server.serve("/inner.wasm", tiny_wasm("behind-a-redirect"))
    hop = module_server.redirect("/hop.wasm", target)
    start = module_server.redirect("/start.wasm", hop)  # allowed -> allowed -> blocked
    monkeypatch.setenv(BLOCKED_CIDRS_ENV, "127.0.0.2/32")
    cache = make_cache(tmp_path)
    error = fetch_error(cache, start)
    assert error.message == (
        f'wasm module download failed after 1 attempts, last error: Get "{target}" (redirected from '
        f"{start}): connection blocked: 127.0.0.2 is in blocked CIDR range 127.0.0.2/32 "
        "(BLOCKED_CIDRS_IN_WASM_FETCH)"
    )
    assert (module_server.count("/start.wasm"), module_server.count("/hop.wasm")) == (1, 1)
    assert blocked_loopback_server.count("/inner.wasm") == 0
    assert cache.metrics.remote_fetch_count.value("download_failure") == 1
    # Without the block the same chain delivers the module: the redirects themselves are fine.
    monkeypatch.delenv(BLOCKED_CIDRS_ENV)
    assert make_cache(tmp_path / "open").get_sync(start).read_bytes() == tiny_wasm("behind-a-redirect")


@pytest.mark.registry
def test_oci_blob_redirects_are_checked(
    other_loopback_registry: Registry, push_image: PushImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest comes from an allowed registry front (127.0.0.1); its blob redirect points at a
    blocked address (127.0.0.2), as a hostile registry would point at a metadata service."""
    wasm = tiny_wasm("oci-redirect")
    push_image(other_loopback_registry, "guard/redirect", "v1", wasm_to_oci_image(wasm))
    proxy = FaultProxy(other_loopback_registry)
    try:
        proxy.plan.redirect_blobs = True
        monkeypatch.setenv(BLOCKED_CIDRS_ENV, "127.0.0.2/32")
        cache = make_cache(tmp_path)
        error = fetch_error(cache, f"oci://{proxy.host}/guard/redirect:v1")
        descriptor_digest = "sha256:" + hashlib.sha256(wasm).hexdigest()
        blob_path = f"/v2/guard/redirect/blobs/{descriptor_digest}"
        assert error.message == (
            f"could not fetch Wasm binary: blob {descriptor_digest} of {proxy.host}/guard/redirect: "
            f'Get "http://{other_loopback_registry.host}{blob_path}" (redirected from '
            f"http://{proxy.host}{blob_path}): connection blocked: 127.0.0.2 is in blocked CIDR range "
            "127.0.0.2/32 (BLOCKED_CIDRS_IN_WASM_FETCH)"
        )
        assert proxy.blob_gets == 1  # refused at once: a blocked hop is not retried
        assert cache.metrics.remote_fetch_count.value("download_failure") == 1
        monkeypatch.delenv(BLOCKED_CIDRS_ENV)
        path = make_cache(tmp_path / "open").get_sync(f"oci://{proxy.host}/guard/redirect:v1")
        assert path.read_bytes() == wasm
    finally:
        proxy.stop()


# ------------------------------------------------------------------------------------ deadlines


def run_wasmesh(
    argv: list[str], env: dict[str, str], timeout_s: float = 120.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wasmesh", *argv], env=env, capture_output=True, text=True, timeout=timeout_s
    )


@pytest.mark.parametrize("trickle", ["body", "headers"])
def test_pull_timeout_bounds_a_trickling_server(
    trickle: str, module_server: ModuleServer, tmp_path: Path
) -> None:
    """A server sending 1 byte a second (~300 s of headers, or 1000 s of body) must not stretch a
    ``--timeout 3`` pull: the deadline covers the whole transfer, not each receive.

    The subprocess limit (120 s) is the only clock here, far above the deadline and far below the
    trickle: the pull either honours its deadline or the test fails.
    """
    body = tiny_wasm("slow") + bytes(1000)
    url = module_server.serve("/slow.wasm", body, trickle_s=1.0, trickle_headers=trickle == "headers")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop(BLOCKED_CIDRS_ENV, None)
    result = run_wasmesh(
        ["pull", url, "-o", str(tmp_path / "out.wasm"), "--cache-dir", str(tmp_path), "--timeout", "3"], env
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(
        f'error: wasm module download failed after 1 attempts, last error: Get "{url}": context '
        "deadline exceeded"
    )
    assert not (tmp_path / "out.wasm").exists()


def test_get_deadline_bounds_each_hostile_fetch(module_server: ModuleServer, tmp_path: Path) -> None:
    url = module_server.serve("/slow.wasm", tiny_wasm("slow") + bytes(1000), trickle_s=1.0)
    cache = make_cache(tmp_path)
    error = fetch_error(cache, url, timeout_s=2.0)
    assert error.message == (
        f'wasm module download failed after 1 attempts, last error: Get "{url}": context deadline '
        "exceeded (Client.Timeout exceeded)"  # the ~330 header bytes alone take 330 s
    )
    assert cache.metrics.remote_fetch_count.value("download_failure") == 1


# ----------------------------------------------------------------------------------- unboxing


def test_the_quine_is_real() -> None:
    import gzip

    quine = gzip_quine()
    assert gzip.decompress(quine) == quine
    assert len(quine) == 286


def test_a_gzip_quine_is_refused_not_unwrapped_forever(
    module_server: ModuleServer, tmp_path: Path, no_blocked_env: None
) -> None:
    url = module_server.serve("/quine.wasm.gz", gzip_quine())
    cache = make_cache(tmp_path)

    async def fetch() -> FetchError:
        with pytest.raises(FetchError) as caught:
            await cache.get(url, timeout_s=30.0)  # an unbounded unwrap ends here as "not fetched"
        return caught.value

    error = asyncio.run(fetch())
    assert error.message == (
        f"wasm module downloaded from {url} could not be unpacked: more than {MAX_ARCHIVE_LAYERS} nested "
        "gzip/tar layers (a gzip quine or an archive bomb)"
    )
    assert cache.metrics.remote_fetch_count.value("download_failure") == 1


def test_nesting_limit_keeps_real_packagings() -> None:
    wasm = tiny_wasm("nested")
    assert unbox_if_possible(nested_gzip(wasm, MAX_ARCHIVE_LAYERS), 1 << 20) == wasm
    with pytest.raises(FetchError) as caught:
        unbox_if_possible(nested_gzip(wasm, MAX_ARCHIVE_LAYERS + 1), 1 << 20)
    assert caught.value.message == (
        f"more than {MAX_ARCHIVE_LAYERS} nested gzip/tar layers (a gzip quine or an archive bomb)"
    )


def test_a_gzip_bomb_stops_at_the_module_size_limit(
    module_server: ModuleServer, tmp_path: Path, no_blocked_env: None
) -> None:
    limit = 8 << 20
    bomb = gzip_bomb(64 << 20)
    url = module_server.serve("/bomb.wasm.gz", bomb)
    cache = make_cache(tmp_path, max_module_bytes=limit)
    error = fetch_error(cache, url)
    assert error.message == (
        f"wasm module downloaded from {url} could not be unpacked: decompressed gzip stream exceeds the "
        f"size limit of {limit} bytes"
    )
    assert cache.metrics.remote_fetch_count.value("download_failure") == 1


def test_many_tiny_gzip_members_are_bounded() -> None:
    import gzip

    member = gzip.compress(b"", mtime=0)
    with pytest.raises(FetchError) as caught:
        unbox_if_possible(member * 10_001, 1 << 20)
    assert caught.value.message == "gzip stream: more than 10000 gzip members"


def test_a_good_module_is_fetched_while_hostile_fetches_are_in_flight(
    module_server: ModuleServer, tmp_path: Path, no_blocked_env: None
) -> None:
    """Two trickling servers and two quines in flight must not starve a good fetch."""
    slow = [
        module_server.serve(f"/slow-{i}.wasm", tiny_wasm("slow") + bytes(1000), trickle_s=1.0)
        for i in range(2)
    ]
    quines = [module_server.serve(f"/quine-{i}.wasm.gz", gzip_quine()) for i in range(2)]
    good_wasm = tiny_wasm("good")
    good = module_server.serve("/good.wasm", good_wasm)
    cache = make_cache(tmp_path)

    async def scenario() -> None:
        hostile = [asyncio.ensure_future(cache.get(url, timeout_s=300.0)) for url in slow + quines]
        while sum(module_server.count(path) for path in ("/slow-0.wasm", "/slow-1.wasm")) < 2:
            await asyncio.sleep(0.05)
        path = await asyncio.wait_for(cache.get(good, timeout_s=60.0), 60.0)
        assert path.read_bytes() == good_wasm
        assert [task.done() for task in hostile[:2]] == [False, False]  # still trickling
        for task in hostile[2:]:
            with pytest.raises(FetchError):
                await asyncio.wait_for(task, 60.0)
        for task in hostile[:2]:
            task.cancel()

    asyncio.run(scenario())
    assert cache.metrics.remote_fetch_count.value("success") == 1


# ------------------------------------------------------------------------------------- file://


def test_file_checksum_mismatch_does_not_reveal_the_digest(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"root:$6$not-for-you\n")
    module = tmp_path / "plugin.wasm"
    module.write_bytes(tiny_wasm("file-checksum"))
    cache = make_cache(tmp_path / "cache")
    wanted = "0" * 64
    for path in (secret, module):
        error = fetch_error(cache, f"file://{path}", sha256=wanted)
        assert (
            error.message == f"module read from file://{path} does not match the expected checksum {wanted}"
        )
        assert hashlib.sha256(path.read_bytes()).hexdigest() not in error.message
    assert cache.metrics.remote_fetch_count.value("checksum_mismatched") == 2


def test_file_urls_are_confined_to_the_allowed_directories(tmp_path: Path) -> None:
    allowed = tmp_path / "modules"
    allowed.mkdir()
    outside = tmp_path / "outside.wasm"
    outside.write_bytes(tiny_wasm("outside"))
    inside = allowed / "inside.wasm"
    inside.write_bytes(tiny_wasm("inside"))
    (allowed / "escape.wasm").symlink_to(outside)
    (allowed / "alias.wasm").symlink_to(inside)  # a symlink that stays inside is fine
    link_to_allowed = tmp_path / "link-to-modules"
    link_to_allowed.symlink_to(allowed)
    cache = make_cache(tmp_path / "cache", allowed_file_dirs=(link_to_allowed,))

    assert cache.get_sync(f"file://{inside}").read_bytes() == tiny_wasm("inside")
    assert cache.get_sync(f"file://{allowed}/alias.wasm").read_bytes() == tiny_wasm("inside")
    for url, shown in [
        (f"file://{outside}", outside),
        (f"file://{allowed}/../outside.wasm", allowed / ".." / "outside.wasm"),
        (f"file://{allowed}/escape.wasm", allowed / "escape.wasm"),
        (f"file://{tmp_path}/modules-sibling/x.wasm", tmp_path / "modules-sibling" / "x.wasm"),
    ]:
        error = fetch_error(cache, url)
        assert error.message == (
            f"file URL {url}: {shown} is outside the allowed module directories ({link_to_allowed}; "
            "--allowed-file-dir)"
        )
    assert cache.metrics.remote_fetch_count.value("download_failure") == 4
    # No restriction configured: any readable file, as Istio.
    assert make_cache(tmp_path / "open").get_sync(f"file://{outside}").read_bytes() == tiny_wasm("outside")


def test_relative_file_urls_cannot_climb_out(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (tmp_path / "up.wasm").write_bytes(tiny_wasm("up"))
    (base / "ok.wasm").write_bytes(tiny_wasm("ok"))
    cache = make_cache(tmp_path / "cache", file_base_dir=base, allowed_file_dirs=(base,))
    assert cache.get_sync("file://ok.wasm").read_bytes() == tiny_wasm("ok")
    error = fetch_error(cache, "file://../up.wasm")
    assert error.message == (
        f"file URL file://../up.wasm: {base / '..' / 'up.wasm'} is outside the allowed module directories "
        f"({base}; --allowed-file-dir)"
    )


def test_pull_and_agent_take_the_allowed_file_dir_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    allowed = tmp_path / "modules"
    allowed.mkdir()
    module = tmp_path / "elsewhere.wasm"
    module.write_bytes(tiny_wasm("pull-file"))
    argv = ["pull", f"file://{module}", "-o", str(tmp_path / "out.wasm"), "--cache-dir", str(tmp_path / "c")]
    assert main([*argv, "--allowed-file-dir", str(allowed)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: file URL file://{module}: {module} is outside the allowed module directories ({allowed}; "
        "--allowed-file-dir)"
    ]
    assert main([*argv, "--allowed-file-dir", str(allowed), "--allowed-file-dir", str(tmp_path)]) == 0
    assert (tmp_path / "out.wasm").read_bytes() == tiny_wasm("pull-file")
    args = build_parser().parse_args(
        ["agent", "--xds", "127.0.0.1:15010", "--plaintext",
         "--allowed-file-dir", "/a", "--allowed-file-dir", "/b"]  # fmt: skip
    )
    assert build_options(args, {}).cache.allowed_file_dirs == (Path("/a"), Path("/b"))


def test_proxy_takes_allowed_file_dirs_from_its_flag_and_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(
        ["proxy", "--xds", "127.0.0.1:15010", "--plaintext", "--node-id", "web-1",
         "--allowed-file-dir", "/srv/wasm"]  # fmt: skip
    )
    cache = build_xds_options(args, {}).proxy().builder.module_cache()
    assert cache.options.allowed_file_dirs == (Path("/srv/wasm"),)
    config = parse_config({"listeners": [], "cache": {"allowed_file_dirs": ["/srv/a", "/srv/b"]}})
    assert config.cache.allowed_file_dirs == ("/srv/a", "/srv/b")
    config_file = tmp_path / "proxy.yaml"
    config_file.write_text("listeners: []\n")
    assert main(["proxy", "--config", str(config_file), "--allowed-file-dir", "/srv/wasm"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: wasmesh proxy: --allowed-file-dir: only with --xds "
        "(a --config file lists them in cache.allowed_file_dirs)"
    )


def test_proxy_config_mode_reads_file_plugins_only_from_allowed_dirs(tmp_path: Path) -> None:
    """A proxy config's file:// plugins (read directly, bypassing the cache) obey allowed_file_dirs too."""
    allowed = tmp_path / "modules"
    allowed.mkdir()
    inside, outside = allowed / "in.wasm", tmp_path / "out.wasm"
    inside.write_bytes(tiny_wasm("proxy-in"))
    outside.write_bytes(tiny_wasm("proxy-out"))
    cache = CacheConfig(dir=str(tmp_path / "cache"), allowed_file_dirs=(str(allowed),))
    builder = WasmChainBuilder(node={}, cache=cache, clusters=lambda: None)

    def plugin(url: str) -> Any:
        body = {
            "apiVersion": "extensions.istio.io/v1alpha1",
            "kind": "WasmPlugin",
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"url": url},
        }
        (parsed,) = parse_resources([PluginResource(body=body, source="<inline>")])
        return parsed

    assert asyncio.run(builder.fetch_module(plugin(f"file://{inside}"))) == tiny_wasm("proxy-in")
    with pytest.raises(PluginChainError) as caught:
        asyncio.run(builder.fetch_module(plugin(f"file://{outside}")))
    assert str(caught.value) == (
        f"<inline>: plugin default.p: cannot fetch file://{outside}: file URL file://{outside}: {outside} is "
        f"outside the allowed module directories ({allowed}; --allowed-file-dir)"
    )
