"""The Ray cluster configs in cluster/ against Ray's own launcher code (the functions `ray up` calls
before it starts any machine), broken variants that this code must refuse, what the YAML says
about GPUs and ports.

The AWS config also goes through Ray's whole AWS bootstrap (IAM profile, key pair, subnets,
security group, resource autodetection from the EC2 instance catalogue) against moto's
simulated EC2/IAM: no AWS account is used. Without moto that test is skipped, except in CI."""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
from pathlib import Path

import click
import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.commands import _bootstrap_config
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CONFIGS = {"a100": CLUSTER / "a100.yaml", "local": CLUSTER / "local.yaml"}

# GPUs, accelerator and vCPUs of the A100 instance types a config may use (AWS and GCP public
# specifications). Used to check the declared resources offline; the moto test below checks the
# AWS ones against Ray's own autodetection as well.
A100_INSTANCES = {
    "p4d.24xlarge": (8, "A100", 96),    # 8x A100 40GB
    "p4de.24xlarge": (8, "A100", 96),   # 8x A100 80GB
    "a2-highgpu-1g": (1, "A100", 12),
    "a2-highgpu-2g": (2, "A100", 24),
    "a2-highgpu-4g": (4, "A100", 48),
    "a2-highgpu-8g": (8, "A100", 96),
    "a2-megagpu-16g": (16, "A100", 96),
    "a2-ultragpu-1g": (1, "A100-80G", 12),
    "a2-ultragpu-8g": (8, "A100-80G", 96),
}
PUBLIC_CIDRS = ("0.0.0.0/0", "::/0")
PRIVATE_PORTS = (5000, 8265)  # MLflow, Ray dashboard: reached through SSH port forwarding only


def load(name: str) -> dict:
    return yaml.safe_load(CONFIGS[name].read_text())


def launcher_checks(config: dict) -> dict:
    """What `ray up` does with a config before its provider talks to a cloud
    (ray.autoscaler._private.commands._bootstrap_config): merge the provider's defaults and the
    launcher's normalisations (prepare_config), then Ray's JSON schema and cross-field checks
    (validate_config)."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def needed(module: str):
    """A test dependency: skipped where missing, but a failure in CI (CI must install it)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed; CI must install it (pip install {module})")
        pytest.skip(f"{module} is not installed (pip install {module})")


def node_types(config: dict) -> dict:
    return config.get("available_node_types", {})


def worker_types(config: dict) -> dict:
    return {k: v for k, v in node_types(config).items() if k != config.get("head_node_type")}


def all_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    commands = [c for k in keys for c in config.get(k, [])]
    for node_type in node_types(config).values():
        commands += [c for k in keys for c in node_type.get(k, [])]
    return commands


# ---------------------------------------------------------------------------------------------
# Ray's launcher accepts both configs.

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_passes_ray_launcher_validation(name):
    prepared = launcher_checks(load(name))
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert "cluster_synced_files" in prepared  # filled from the provider's defaults


def test_local_config_goes_through_the_whole_launcher_bootstrap():
    # The local provider needs no cloud: this is everything `ray up` does before SSH.
    config = _bootstrap_config(load("local"), no_config_cache=True)
    (node_type,) = config["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == len(config["provider"]["worker_ips"]) == 2
    assert config["provider"]["head_ip"].startswith("192.0.2.")  # documentation range: placeholders


@pytest.fixture
def simulated_aws(tmp_path, monkeypatch):
    """moto's EC2/IAM in this process; HOME in tmp_path (Ray writes the key pair's .pem there)."""
    moto = needed("moto")
    boto3 = needed("boto3")
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-west-2",
                       "AWS_CONFIG_FILE": str(tmp_path / "none"),
                       "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "HOME": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with moto.mock_aws():
        # The instance profile and role that Ray creates on an account's first `ray up` (creating
        # them, Ray sleeps 30 s "for propagation"; moto also lacks AWS's managed policies).
        iam = boto3.client("iam", region_name="us-west-2")
        iam.create_role(RoleName="ray-autoscaler-v1", AssumeRolePolicyDocument=json.dumps({"Statement": [
            {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}))
        iam.create_instance_profile(InstanceProfileName="ray-autoscaler-v1")
        iam.add_role_to_instance_profile(InstanceProfileName="ray-autoscaler-v1", RoleName="ray-autoscaler-v1")
        yield boto3


def test_a100_config_bootstraps_on_simulated_aws(simulated_aws):
    config = load("a100")
    resolved = _bootstrap_config(copy.deepcopy(config), no_config_cache=True)
    ec2 = simulated_aws.client("ec2", region_name=config["provider"]["region"])

    # The security group Ray created for the cluster: SSH is the only rule open to any address.
    group_ids = {g for t in resolved["available_node_types"].values() for g in t["node_config"]["SecurityGroupIds"]}
    (group,) = ec2.describe_security_groups(GroupIds=sorted(group_ids))["SecurityGroups"]
    assert group["GroupName"] == config["provider"]["security_group"]["GroupName"]
    for rule in group["IpPermissions"]:
        cidrs = [r["CidrIp"] for r in rule.get("IpRanges", [])] + [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
        if cidrs:
            assert (rule["IpProtocol"], rule.get("FromPort"), rule.get("ToPort")) == ("tcp", 22, 22), rule
        else:  # the intra-cluster rule: members of the group only
            assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == [group["GroupId"]], rule

    # Ray's own resource autodetection from the EC2 instance catalogue agrees with what we declare.
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    undeclared = copy.deepcopy(prepare_config(copy.deepcopy(config)))
    for node_type in undeclared["available_node_types"].values():
        node_type.pop("resources")
    detected = AWSNodeProvider.fillout_available_node_types_resources(undeclared)["available_node_types"]
    for name, node_type in config["available_node_types"].items():
        declared, auto = node_type["resources"], detected[name]["resources"]
        if name == config["head_node_type"]:
            assert "GPU" not in auto and declared.get("GPU", 0) == 0
            continue
        assert declared["GPU"] == auto["GPU"], (name, declared, auto)
        assert declared["CPU"] == auto["CPU"], (name, declared, auto)
        assert {k for k in declared if k.startswith("accelerator_type:")} == \
            {k for k in auto if k.startswith("accelerator_type:")} == {"accelerator_type:A100"}


# ---------------------------------------------------------------------------------------------
# Ray's launcher refuses broken configs.

def _drop_provider(c):
    del c["provider"]


def _worker(c):
    return next(iter(worker_types(c).values()))


BROKEN_A100 = {
    "worker type without node_config": (lambda c: _worker(c).pop("node_config"), jsonschema.ValidationError,
                                        "'node_config' is a required property"),
    "worker type without resources": (lambda c: _worker(c).pop("resources"), jsonschema.ValidationError,
                                      "'resources' is a required property"),
    "GPU count not an integer": (lambda c: _worker(c)["resources"].update(GPU="eight"), jsonschema.ValidationError,
                                 "is not of type 'integer'"),
    "unknown node-type field": (lambda c: _worker(c).update(min_worker=1), jsonschema.ValidationError,
                                "Additional properties are not allowed"),
    "head_node_type names an unknown type": (lambda c: c.update(head_node_type="gpu_head"), ValueError,
                                             "`head_node_type` must be one of `available_node_types`"),
    "misspelt top-level key": (lambda c: c.update(setup_command=["true"]), jsonschema.ValidationError,
                               "Additional properties are not allowed"),
    "min_workers above max_workers": (lambda c: c.update(max_workers=0), ValueError,
                                      "max_workers` is smaller than the sum of `min_workers"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_A100))
def test_broken_a100_config_fails_launcher_validation(case):
    mutate, error, message = BROKEN_A100[case]
    config = load("a100")
    mutate(config)
    with pytest.raises(error, match=re.escape(message)):
        launcher_checks(config)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_without_provider_fails(name):
    config = load(name)
    _drop_provider(config)
    with pytest.raises(KeyError, match="provider"):  # `ray up` reads config["provider"]["type"] first
        launcher_checks(config)
    prepared = launcher_checks(load(name))  # and the schema itself requires it
    _drop_provider(prepared)
    with pytest.raises(jsonschema.ValidationError, match="'provider' is a required property"):
        validate_config(prepared)


@pytest.mark.parametrize("case,mutate,message", [
    ("no head_ip", lambda c: c["provider"].pop("head_ip"), "Please supply a `head_ip` and list of `worker_ips`"),
    ("no worker_ips", lambda c: c["provider"].pop("worker_ips"), "Please supply a `head_ip` and list of `worker_ips`"),
    ("node types", lambda c: c.update(available_node_types={"gpu": {"node_config": {}, "resources": {"GPU": 1}}}),
     "available_node_types"),
])
def test_broken_local_config_fails_launcher_validation(case, mutate, message):
    config = load("local")
    mutate(config)
    with pytest.raises(click.ClickException) as info:
        launcher_checks(config)
    assert message in info.value.message


# ---------------------------------------------------------------------------------------------
# GPUs, image, ports, files: what the YAML says.

def test_a100_workers_declare_the_gpus_of_their_instance_type():
    config = load("a100")
    head = node_types(config)[config["head_node_type"]]
    assert head["node_config"]["InstanceType"] not in A100_INSTANCES
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0  # no trials on the head
    workers = worker_types(config)
    assert workers
    for name, node_type in workers.items():
        instance = node_type["node_config"].get("InstanceType") or node_type["node_config"].get("machineType")
        assert instance in A100_INSTANCES, f"{name}: {instance} is not an A100 instance type"
        gpus, accelerator, vcpus = A100_INSTANCES[instance]
        resources = node_type["resources"]
        # One trial asks for 1 GPU: Ray then runs exactly `gpus` trials on a node, one per A100.
        assert resources["GPU"] == gpus, (name, resources)
        assert 0 < resources["CPU"] <= vcpus, (name, resources)
        assert resources.get(f"accelerator_type:{accelerator}") == 1, (name, resources)
        assert 0 <= node_type.get("min_workers", 0) <= node_type["max_workers"] <= config["max_workers"]


def test_a100_image_carries_the_ray_version_that_launches_it():
    image = load("a100")["docker"]["image"]
    repository, tag = image.split(":")
    assert repository == "rayproject/ray"
    version, python, flavour = tag.split("-")
    assert version == ray.__version__  # `ray up` needs the same Ray on the laptop and the cluster
    assert python == "py311"
    assert flavour == "gpu" or flavour.startswith("cu12"), tag


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_no_config_opens_the_dashboard_or_mlflow_publicly(name):
    config = load(name)
    # Cloud firewall rules that the config adds: none may open anything but SSH to the internet.
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if any(c in PUBLIC_CIDRS for c in cidrs):
            assert (rule.get("FromPort"), rule.get("ToPort")) == (22, 22), rule
    # No container port is published (Ray runs the container with --net=host anyway).
    docker = config.get("docker") or {}
    options = [o for k in ("run_options", "head_run_options", "worker_run_options") for o in docker.get(k, [])]
    assert not [o for o in options if o.split("=")[0].split()[0] in ("-p", "--publish", "-P", "--publish-all")]
    # Nothing binds to all interfaces: the dashboard and MLflow on 127.0.0.1 (only the driver, on
    # the head, talks to MLflow).
    commands = all_commands(config)
    assert not [c for c in commands if re.search(r"(?<![\d.])0\.0\.0\.0(?![\d])|--host :: |\[::\]", c)], commands
    head_start = config["head_start_ray_commands"]
    (ray_start,) = [c for c in head_start if "ray start --head" in c]
    assert "--dashboard-host=127.0.0.1" in ray_start
    (mlflow_start,) = [c for c in head_start if "mlflow/server.sh" in c]
    assert "--host 127.0.0.1" in mlflow_start and "--port 5000" in mlflow_start
    assert not [c for c in commands if "5000" in c and c not in head_start]  # no MLflow route from the workers


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_ships_this_repo_and_uses_its_scripts(name):
    config = load(name)
    assert config["file_mounts"] == {"~/softfine-tune": "."}  # `ray up` runs in the repo root
    assert ".gitignore" in config["rsync_filter"]  # runs, stores, checkpoints stay behind
    commands = all_commands(config)
    assert any('pip install -q -e "$HOME/softfine-tune[tune]"' in c for c in commands)
    for script in ("mlflow/server.sh",):
        assert any(f"~/softfine-tune/{script}" in c for c in commands), script
        assert os.access(REPO / script, os.X_OK), script
