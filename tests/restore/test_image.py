"""Checkpoint images: ``--oci-layout`` read by skopeo, ``--image`` pushed to a real docker-registry
(plain HTTP with the explicit --insecure-registry, and TLS + htpasswd basic auth) and read back
with skopeo: annotations present, the layer byte-identical to the kubelet's tar."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from backupd.restore import oci

from .conftest import REGISTRY_BIN, SKOPEO_BIN, Registry, Rig, skopeo

ANNOTATION = "io.kubernetes.cri-o.annotations.checkpoint.name"


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    os.chmod(path, 0o600)
    path.write_bytes(bytes(data))


def _check_annotations(annotations: dict[str, str], archive, engine: str = "cri-o") -> None:  # type: ignore[no-untyped-def]
    assert annotations[ANNOTATION] == "nginx"
    assert annotations["org.criu.checkpoint.container.name"] == "nginx"
    assert annotations["org.criu.checkpoint.engine.name"] == engine
    assert annotations["org.criu.checkpoint.pod.name"] == archive.pod
    assert annotations["org.criu.checkpoint.pod.namespace"] == "default"
    assert annotations["org.criu.checkpoint.rootfsImageName"] == "docker.io/library/nginx:1.27"
    assert annotations["org.criu.checkpoint.rootfsImageSha"].startswith("sha256:")
    assert len(annotations["org.criu.checkpoint.rootfsImageID"]) == 64
    assert annotations["io.backupd.archive.id"] == archive.id


@pytest.mark.skipif(SKOPEO_BIN is None, reason="skopeo is not installed (apt-get install skopeo)")
def test_oci_layout_is_a_checkpoint_image_skopeo_reads(rig: Rig, tmp_path: Path, capsys) -> None:
    archive = rig.take()[0]
    layout_dir = tmp_path / "image"
    out, _ = rig.run("restore", archive.id, "--oci-layout", str(layout_dir), "-o", "json", capsys=capsys)
    result = json.loads(out)
    assert result["ref_name"] == archive.id

    index = json.loads((layout_dir / "index.json").read_text())
    [entry] = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == archive.id
    _check_annotations(entry["annotations"], archive)
    for p in [layout_dir, *layout_dir.rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    inspected = json.loads(skopeo("inspect", f"oci:{layout_dir}:{archive.id}"))
    assert inspected["Layers"] == [f"sha256:{archive.tar_sha256}"]
    assert inspected["Labels"][ANNOTATION] == "nginx"
    raw = json.loads(skopeo("inspect", "--raw", f"oci:{layout_dir}:{archive.id}"))
    assert raw["layers"][0]["mediaType"] == oci.MEDIA_LAYER
    _check_annotations(raw["annotations"], archive)
    config = json.loads(skopeo("inspect", "--config", "--raw", f"oci:{layout_dir}:{archive.id}"))
    assert config["rootfs"]["diff_ids"] == [f"sha256:{archive.tar_sha256}"]

    copied = tmp_path / "copied"
    skopeo("copy", "-q", f"oci:{layout_dir}:{archive.id}", f"dir:{copied}")
    assert (copied / archive.tar_sha256).read_bytes() == rig.node_tar(archive).read_bytes()


def test_oci_layout_from_a_corrupted_object_leaves_nothing(rig: Rig, tmp_path: Path, capsys) -> None:
    archive = rig.take()[0]
    _flip_a_bit(rig.stored(archive))
    layout_dir = tmp_path / "image"
    _, err = rig.run("restore", archive.id, "--oci-layout", str(layout_dir), code=7, capsys=capsys)
    assert f"archive {archive.id}" in err
    assert not layout_dir.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_push_reads_back_with_skopeo_and_the_pod_manifest_runs_it(rig: Rig, registry: Registry, tmp_path: Path,
                                                                  capsys) -> None:
    archive = rig.take()[0]
    repo = f"{registry.host}/checkpoints/web"
    pod_yaml = tmp_path / "pod.yaml"
    out, _ = rig.run("restore", archive.id, "--image", repo, "--insecure-registry", "--pod-manifest",
                     str(pod_yaml), "--pin-node", "--label", "team=checkout", "-o", "json", capsys=capsys)
    result = json.loads(out)
    assert result["image"] == f"{repo}:{archive.id}" and result["layer"] == "uploaded"
    src = f"docker://{repo}:{archive.id}"

    raw = json.loads(skopeo("inspect", "--raw", *registry.skopeo_auth(), src))
    _check_annotations(raw["annotations"], archive)
    assert raw["layers"] == [{"mediaType": oci.MEDIA_LAYER, "digest": f"sha256:{archive.tar_sha256}",
                              "size": archive.tar_size}]  # fmt: skip
    inspected = json.loads(skopeo("inspect", *registry.skopeo_auth(), src))
    assert inspected["Digest"] == result["manifest_digest"]
    copied = tmp_path / "copied"
    skopeo("copy", "-q", *[f.replace("--", "--src-", 1) for f in registry.skopeo_auth()], src, f"dir:{copied}")
    assert (copied / archive.tar_sha256).read_bytes() == rig.node_tar(archive).read_bytes()

    text = pod_yaml.read_text()
    assert stat.S_IMODE(pod_yaml.stat().st_mode) == 0o600
    assert "enable_criu_support = true" in text and "drop_infra_ctr = false" in text
    assert "crictl pull docker.io/library/nginx:1.27" in text and ">= 2.4 cannot restore" in text
    pod = yaml.safe_load(text)
    assert pod["kind"] == "Pod" and pod["metadata"]["namespace"] == "default"
    assert pod["metadata"]["name"] == archive.pod
    # the pod's own labels, recorded from the kubelet's /pods at checkpoint time, plus --label
    assert pod["metadata"]["labels"] == {"app": "web", "tier": "frontend", "team": "checkout"}
    assert pod["spec"]["nodeName"] == "sim-node"
    assert pod["spec"]["containers"] == [{"name": "nginx", "image": f"{repo}@{result['manifest_digest']}"}]

    # the same archive again: the layer is already there, the manifest digest is the same
    out, _ = rig.run("restore", archive.id, "--image", repo, "--insecure-registry", "-o", "json", capsys=capsys)
    again = json.loads(out)
    assert again["layer"] == "exists" and again["manifest_digest"] == result["manifest_digest"]

    # another repository: mounted from the first, no upload
    other = f"{registry.host}/dr/web"
    out, _ = rig.run("restore", archive.id, "--image", f"{other}:v1", "--insecure-registry", "--mount-from",
                     "checkpoints/web", "-o", "json", capsys=capsys)
    assert json.loads(out)["layer"] == "mounted"
    assert json.loads(skopeo("inspect", *registry.skopeo_auth(), f"docker://{other}:v1"))["Layers"] == [
        f"sha256:{archive.tar_sha256}"]


def test_chunked_upload_and_workload_template(rig: Rig, registry: Registry, tmp_path: Path, capsys) -> None:
    archives = rig.take()
    archive = archives[-1]
    repo = f"{registry.host}/chunked/web"
    pod_yaml = tmp_path / "deploy.yaml"
    out, _ = rig.run("restore", "--latest", "--namespace", "default", "--workload", "deployment/web", "--container",
                     "nginx", "--image", f"{repo}:dr", "--insecure-registry", "--chunk-size", "512Ki",
                     "--pod-manifest", str(pod_yaml), "--node-name", "node-b", "-o", "json", capsys=capsys)
    result = json.loads(out)
    assert result["layer"] == "uploaded" and result["archive"]["id"] == archive.id
    copied = tmp_path / "copied"
    skopeo("copy", "-q", "--src-tls-verify=false", f"docker://{repo}:dr", f"dir:{copied}")
    assert (copied / archive.tar_sha256).read_bytes() == rig.node_tar(archive).read_bytes()

    deploy = yaml.safe_load(pod_yaml.read_text())
    assert (deploy["apiVersion"], deploy["kind"]) == ("apps/v1", "Deployment")
    assert deploy["metadata"]["name"] == "web" and deploy["spec"]["replicas"] == 1
    template = deploy["spec"]["template"]
    assert deploy["spec"]["selector"]["matchLabels"] == template["metadata"]["labels"]
    assert "pod-template-hash" not in template["metadata"]["labels"]
    assert template["metadata"]["labels"]["app"] == "web"
    assert template["spec"]["nodeName"] == "node-b"
    assert template["spec"]["containers"][0]["image"] == f"{repo}@{result['manifest_digest']}"


def test_a_corrupted_object_is_never_completed_in_the_registry(rig: Rig, registry: Registry, tmp_path: Path,
                                                              capsys) -> None:
    archive = rig.take()[0]
    _flip_a_bit(rig.stored(archive))
    repo = f"{registry.host}/corrupt/web"
    _, err = rig.run("restore", archive.id, "--image", repo, "--insecure-registry", code=7, capsys=capsys)
    assert f"archive {archive.id}" in err
    with httpx.Client() as c:
        assert c.head(f"http://{registry.host}/v2/corrupt/web/blobs/sha256:{archive.tar_sha256}").status_code == 404
        assert c.get(f"http://{registry.host}/v2/corrupt/web/manifests/{archive.id}").status_code == 404


def test_plain_http_needs_the_explicit_insecure_flag(rig: Rig, registry: Registry, capsys) -> None:
    archive = rig.take()[0]
    _, err = rig.run("restore", archive.id, "--image", f"{registry.host}/checkpoints/web", code=6, capsys=capsys)
    assert "TLS handshake failed" in err and "--insecure-registry" in err


def test_tls_registry_with_basic_auth(rig: Rig, auth_registry: Registry, tmp_path: Path, capsys) -> None:
    archive = rig.take()[0]
    assert auth_registry.ca_file is not None and auth_registry.password is not None
    repo = f"{auth_registry.host}/private/web"
    password_file = tmp_path / "registry-password"
    password_file.write_text(auth_registry.password + "\n")
    creds = ["--registry-username", str(auth_registry.username)]
    ca = ["--registry-ca-file", str(auth_registry.ca_file)]

    # TLS is verified: the throw-away CA is not trusted unless given
    _, err = rig.run("restore", archive.id, "--image", repo, *creds, "--registry-password-file", str(password_file),
                     code=6, capsys=capsys)
    assert "TLS handshake failed" in err and "--registry-ca-file" in err
    # no credentials
    _, err = rig.run("restore", archive.id, "--image", repo, *ca, code=6, capsys=capsys)
    assert "requires credentials" in err and "--registry-username" in err
    # a wrong password: refused, and never echoed
    wrong = "wrong-" + auth_registry.password
    out, err = rig.run("restore", archive.id, "--image", repo, *ca, *creds, code=6,
                       env={"BACKUPD_REGISTRY_PASSWORD": wrong}, capsys=capsys)
    assert "unauthorized" in err and wrong not in out + err

    out, err = rig.run("restore", archive.id, "--image", repo, *ca, *creds, "--registry-password-file",
                       str(password_file), "-o", "json", capsys=capsys)
    assert auth_registry.password not in out + err
    digest = json.loads(out)["manifest_digest"]
    raw = skopeo("inspect", "--raw", *auth_registry.skopeo_auth(), f"docker://{repo}:{archive.id}")
    _check_annotations(json.loads(raw)["annotations"], archive)
    assert oci.sha256_digest(raw.encode()) == digest

    # the password from the environment works as well
    out, _ = rig.run("restore", archive.id, "--image", f"{repo}:env", *ca, *creds, "-o", "json",
                     env={"BACKUPD_REGISTRY_PASSWORD": auth_registry.password}, capsys=capsys)
    assert json.loads(out)["layer"] == "exists"


@pytest.mark.skipif(SKOPEO_BIN is None or REGISTRY_BIN is None,
                    reason="needs Debian's docker-registry and skopeo (apt-get install docker-registry skopeo)")
def test_a_deduplicated_archive_restores_to_a_file_an_oci_layout_and_a_registry_alike(
        rig_factory: Callable[..., Rig], registry: Registry, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """``format = "dedup"``: the tar is rebuilt from its recipe and packs underneath, and every
    destination gets the kubelet's tar byte for byte, as from the full format."""
    rig = rig_factory(fmt="dedup")
    rig.take()
    archive = rig.take()[0]  # a second checkpoint: most of its chunks are in the first one's packs
    assert archive.key.endswith(".recipe")
    node_tar = rig.node_tar(archive).read_bytes()

    rig.run("restore", archive.id, "--to", str(tmp_path / "restored.tar"), capsys=capsys)
    assert (tmp_path / "restored.tar").read_bytes() == node_tar

    layout_dir = tmp_path / "image"
    rig.run("restore", archive.id, "--oci-layout", str(layout_dir), capsys=capsys)
    assert json.loads(skopeo("inspect", f"oci:{layout_dir}:{archive.id}"))["Layers"] == [
        f"sha256:{archive.tar_sha256}"]
    skopeo("copy", "-q", f"oci:{layout_dir}:{archive.id}", f"dir:{tmp_path / 'from-layout'}")
    assert (tmp_path / "from-layout" / archive.tar_sha256).read_bytes() == node_tar

    repo = f"{registry.host}/checkpoints/dedup"
    out, _ = rig.run("restore", archive.id, "--image", repo, "--insecure-registry", "-o", "json", capsys=capsys)
    assert json.loads(out)["layer"] == "uploaded"
    skopeo("copy", "-q", *[f.replace("--", "--src-", 1) for f in registry.skopeo_auth()],
           f"docker://{repo}:{archive.id}", f"dir:{tmp_path / 'from-registry'}")
    assert (tmp_path / "from-registry" / archive.tar_sha256).read_bytes() == node_tar
