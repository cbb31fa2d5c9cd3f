"""The Ray cluster configs in cluster/ against Ray's own launcher code (the functions `ray up` calls
before it starts any machine), broken variants that this code must refuse, what the YAML says
about GPUs and ports.

The AWS configs (a100.yaml with S3 storage, a100-nfs.yaml with NFS) also go through Ray's whole
AWS bootstrap (IAM profile, key pair, subnets, security group, resource autodetection from the EC2
instance catalogue) and launch their head and a worker against moto's simulated EC2/IAM (spot
workers, on-demand head, the instance profiles): no AWS account is used. Without moto those tests
are skipped, except in CI. Then what the cloud set-up promises: S3 as the search's storage, IAM
instance profiles and never a key in a file, NFS kept as the alternative."""

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
CONFIGS = {
    "a100": CLUSTER / "a100.yaml",
    "a100-nfs": CLUSTER / "a100-nfs.yaml",
    "local": CLUSTER / "local.yaml",
}
AWS_CONFIGS = ("a100", "a100-nfs")

# GPUs, accelerator and vCPUs of the A100 instance types a config may use (AWS and GCP public
# specifications). Used to check the declared resources offline; the moto test below checks the
# AWS ones against Ray's own autodetection as well.
A100_INSTANCES = {
    "p4d.24xlarge": (8, "A100", 96),  # 8x A100 40GB
    "p4de.24xlarge": (8, "A100", 96),  # 8x A100 80GB
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
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
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
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-west-2",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "HOME": str(tmp_path),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with moto.mock_aws():
        # The instance profile and role that Ray creates on an account's first `ray up` (creating
        # them, Ray sleeps 30 s "for propagation"; moto also lacks AWS's managed policies).
        iam = boto3.client("iam", region_name="us-west-2")
        iam.create_role(
            RoleName="ray-autoscaler-v1",
            AssumeRolePolicyDocument=json.dumps(
                {
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Service": "ec2.amazonaws.com"},
                            "Action": "sts:AssumeRole",
                        }
                    ]
                }
            ),
        )
        iam.create_instance_profile(InstanceProfileName="ray-autoscaler-v1")
        iam.add_role_to_instance_profile(
            InstanceProfileName="ray-autoscaler-v1", RoleName="ray-autoscaler-v1"
        )
        # a100.yaml's own profiles, as cluster/README.md creates them (role and profile of one name).
        for name in ("softfine-ray-head", "softfine-ray-worker"):
            iam.create_role(
                RoleName=name, AssumeRolePolicyDocument=(CLUSTER / "iam" / "ec2-trust.json").read_text()
            )
            iam.create_instance_profile(InstanceProfileName=name)
            iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
        yield boto3


@pytest.mark.parametrize("name", AWS_CONFIGS)
def test_a100_config_bootstraps_and_launches_on_simulated_aws(simulated_aws, name):
    config = load(name)
    resolved = _bootstrap_config(copy.deepcopy(config), no_config_cache=True)
    ec2 = simulated_aws.client("ec2", region_name=config["provider"]["region"])

    # The security group Ray created for the cluster: SSH is the only rule open to any address.
    group_ids = {
        g for t in resolved["available_node_types"].values() for g in t["node_config"]["SecurityGroupIds"]
    }
    (group,) = ec2.describe_security_groups(GroupIds=sorted(group_ids))["SecurityGroups"]
    assert group["GroupName"] == config["provider"]["security_group"]["GroupName"]
    for rule in group["IpPermissions"]:
        cidrs = [r["CidrIp"] for r in rule.get("IpRanges", [])] + [
            r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])
        ]
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
    for type_name, node_type in config["available_node_types"].items():
        declared, auto = node_type["resources"], detected[type_name]["resources"]
        if type_name == config["head_node_type"]:
            assert "GPU" not in auto and declared.get("GPU", 0) == 0
            continue
        assert declared["GPU"] == auto["GPU"], (type_name, declared, auto)
        assert declared["CPU"] == auto["CPU"], (type_name, declared, auto)
        assert (
            {k for k in declared if k.startswith("accelerator_type:")}
            == {k for k in auto if k.startswith("accelerator_type:")}
            == {"accelerator_type:A100"}
        )

    launch_every_node_type(simulated_aws, name, config, resolved)


def launch_every_node_type(boto3, name: str, config: dict, resolved: dict) -> None:
    """The node configs as Ray's AWS provider sends them to EC2's RunInstances (botocore checks
    every field against the API's model; moto launches them): the workers come up as spot
    instances, the head on demand, each with its instance profile."""
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    provider = AWSNodeProvider(resolved["provider"], resolved["cluster_name"])
    head_type = resolved["head_node_type"]
    for type_name, node_type in resolved["available_node_types"].items():
        node_config = copy.deepcopy(node_type["node_config"])
        if type_name == head_type:  # as `ray up` launches the head (commands.get_or_create_head_node)
            node_config = {**copy.deepcopy(resolved.get("head_node", {})), **node_config}
        provider.create_node(node_config, {"ray-user-node-type": type_name}, 1)
    ec2 = boto3.client("ec2", region_name=config["provider"]["region"])
    launched = {}
    for reservation in ec2.describe_instances()["Reservations"]:
        for instance in reservation["Instances"]:
            tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
            launched[tags["ray-user-node-type"]] = instance
    assert set(launched) == set(config["available_node_types"])
    for type_name, instance in launched.items():
        profile = instance.get("IamInstanceProfile", {}).get("Arn", "")
        if type_name == head_type:
            assert instance.get("InstanceLifecycle") is None, instance  # on demand
            expected = (
                config["available_node_types"][head_type]["node_config"]
                .get("IamInstanceProfile", {})
                .get("Name", "ray-autoscaler-v1")
            )  # else Ray's default profile for the head
            assert profile.endswith(f":instance-profile/{expected}"), profile
        else:
            assert instance["InstanceLifecycle"] == "spot", instance
            assert instance["InstanceType"] in A100_INSTANCES
            if name == "a100":  # the trials write their checkpoints to S3: they need a profile
                assert profile.endswith(":instance-profile/softfine-ray-worker"), profile


# ---------------------------------------------------------------------------------------------
# Ray's launcher refuses broken configs.


def _drop_provider(c):
    del c["provider"]


def _worker(c):
    return next(iter(worker_types(c).values()))


BROKEN_A100 = {
    "worker type without node_config": (
        lambda c: _worker(c).pop("node_config"),
        jsonschema.ValidationError,
        "'node_config' is a required property",
    ),
    "worker type without resources": (
        lambda c: _worker(c).pop("resources"),
        jsonschema.ValidationError,
        "'resources' is a required property",
    ),
    "GPU count not an integer": (
        lambda c: _worker(c)["resources"].update(GPU="eight"),
        jsonschema.ValidationError,
        "is not of type 'integer'",
    ),
    "unknown node-type field": (
        lambda c: _worker(c).update(min_worker=1),
        jsonschema.ValidationError,
        "Additional properties are not allowed",
    ),
    "head_node_type names an unknown type": (
        lambda c: c.update(head_node_type="gpu_head"),
        ValueError,
        "`head_node_type` must be one of `available_node_types`",
    ),
    "misspelt top-level key": (
        lambda c: c.update(setup_command=["true"]),
        jsonschema.ValidationError,
        "Additional properties are not allowed",
    ),
    "min_workers above max_workers": (
        lambda c: c.update(max_workers=0),
        ValueError,
        "max_workers` is smaller than the sum of `min_workers",
    ),
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


@pytest.mark.parametrize(
    "case,mutate,message",
    [
        (
            "no head_ip",
            lambda c: c["provider"].pop("head_ip"),
            "Please supply a `head_ip` and list of `worker_ips`",
        ),
        (
            "no worker_ips",
            lambda c: c["provider"].pop("worker_ips"),
            "Please supply a `head_ip` and list of `worker_ips`",
        ),
        (
            "node types",
            lambda c: c.update(available_node_types={"gpu": {"node_config": {}, "resources": {"GPU": 1}}}),
            "available_node_types",
        ),
    ],
)
def test_broken_local_config_fails_launcher_validation(case, mutate, message):
    config = load("local")
    mutate(config)
    with pytest.raises(click.ClickException) as info:
        launcher_checks(config)
    assert message in info.value.message


# ---------------------------------------------------------------------------------------------
# GPUs, image, ports, files: what the YAML says.


@pytest.mark.parametrize("name", AWS_CONFIGS)
def test_a100_workers_declare_the_gpus_of_their_instance_type(name):
    config = load(name)
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


@pytest.mark.parametrize("name", AWS_CONFIGS)
def test_a100_image_carries_the_ray_version_that_launches_it(name):
    image = load(name)["docker"]["image"]
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
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        ]
        if any(c in PUBLIC_CIDRS for c in cidrs):
            assert (rule.get("FromPort"), rule.get("ToPort")) == (22, 22), rule
    # No container port is published (Ray runs the container with --net=host anyway).
    docker = config.get("docker") or {}
    options = [
        o for k in ("run_options", "head_run_options", "worker_run_options") for o in docker.get(k, [])
    ]
    assert not [
        o for o in options if o.split("=")[0].split()[0] in ("-p", "--publish", "-P", "--publish-all")
    ]
    # Nothing binds to all interfaces: the dashboard and MLflow on 127.0.0.1 (only the driver, on
    # the head, talks to MLflow).
    commands = all_commands(config)
    assert not [c for c in commands if re.search(r"(?<![\d.])0\.0\.0\.0(?![\d])|--host :: |\[::\]", c)], (
        commands
    )
    head_start = config["head_start_ray_commands"]
    (ray_start,) = [c for c in head_start if "ray start --head" in c]
    assert "--dashboard-host=127.0.0.1" in ray_start
    (mlflow_start,) = [c for c in head_start if "mlflow/server.sh" in c]
    assert "--host 127.0.0.1" in mlflow_start and "--port 5000" in mlflow_start
    assert not [
        c for c in commands if "5000" in c and c not in head_start
    ]  # no MLflow route from the workers


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


# ---------------------------------------------------------------------------------------------
# The cloud set-up (issue #27): S3 storage with instance profiles, spot workers, NFS kept.

S3_URI = re.compile(r"s3://([a-zA-Z0-9.\-]+)/([^\s'\"]+)")
KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")  # the form of AWS access key ids
KEY_VALUE = re.compile(
    r"(?i)\baws_(?:access_key_id|secret_access_key|session_token)\b['\"]?\s*[=:]\s*['\"]?[A-Za-z0-9/+]"
)
KEY_NAME = re.compile(r"(?i)\baws_(?:access_key_id|secret_access_key|session_token)\b")


def credential_leaks(text: str, *, strict: bool) -> list[str]:
    """AWS access key ids, and assignments of a key, secret or session token; with strict, any
    mention of those variables (a cluster config has no business with them at all)."""
    found = KEY_ID.findall(text) + [m.group(0) for m in KEY_VALUE.finditer(text)]
    return found + ([m.group(0) for m in KEY_NAME.finditer(text)] if strict else [])


def test_credential_check_finds_keys():
    assert credential_leaks("run_options: [--env=AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG]", strict=False)
    assert credential_leaks("aws_access_key_id = AKIAIOSFODNN7EXAMPLE\n", strict=False)
    assert credential_leaks("export AWS_SESSION_TOKEN=abc", strict=False)
    assert credential_leaks("- echo $AWS_SECRET_ACCESS_KEY", strict=True)
    assert not credential_leaks(
        "aws configure   # or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE", strict=False
    )


def test_no_aws_key_in_any_cluster_file():
    files = sorted(p for p in CLUSTER.rglob("*") if p.is_file())
    assert {CLUSTER / "a100.yaml", CLUSTER / "a100-nfs.yaml", CLUSTER / "README.md"} <= set(files)
    for path in files:
        text = path.read_text()
        assert not credential_leaks(text, strict=path.suffix == ".yaml"), path


def worker_and_head(config: dict) -> tuple[dict, dict]:
    (worker,) = worker_types(config).values()
    return worker, node_types(config)[config["head_node_type"]]


@pytest.mark.parametrize("name", AWS_CONFIGS)
def test_a100_workers_are_spot_and_the_head_on_demand(name):
    config = load(name)
    worker, head = worker_and_head(config)
    market = worker["node_config"]["InstanceMarketOptions"]
    assert market["MarketType"] == "spot"
    # One-time requests that end with the instance: a persistent request would relaunch a node
    # the autoscaler already replaced.
    assert market["SpotOptions"] == {
        "SpotInstanceType": "one-time",
        "InstanceInterruptionBehavior": "terminate",
    }
    # on demand: the driver, GCS and MLflow live there
    assert "InstanceMarketOptions" not in head["node_config"]
    # Sizes and limits as before the move to the cloud's storage.
    assert (config["max_workers"], config["idle_timeout_minutes"]) == (4, 15)
    assert (worker["min_workers"], worker["max_workers"]) == (1, 4)
    assert worker["node_config"]["InstanceType"] == "p4d.24xlarge"
    assert head["node_config"]["InstanceType"] == "m5.2xlarge"


def mlflow_destination(config: dict) -> str | None:
    (command,) = [c for c in config["head_start_ray_commands"] if "mlflow/server.sh" in c]
    words = command.split()
    return words[words.index("--artifacts-destination") + 1] if "--artifacts-destination" in words else None


def storage_paths_in_readme() -> list[str]:
    return re.findall(r"--storage-path\s+(\S+)", (CLUSTER / "README.md").read_text())


def test_a100_keeps_the_search_state_in_s3():
    config = load("a100")
    bucket, prefix = S3_URI.fullmatch(mlflow_destination(config)).groups()
    prefix, _, artifacts = prefix.rpartition("/")
    assert artifacts == "mlflow-artifacts"
    # The search's command in cluster/README.md stores in the same bucket and prefix.
    assert f"s3://{bucket}/{prefix}" in storage_paths_in_readme()
    # Nothing shared between the nodes but the network: no NFS, no /mnt/shared.
    docker = config["docker"]
    texts = all_commands(config) + [
        o for k in ("run_options", "head_run_options", "worker_run_options") for o in docker.get(k, [])
    ]
    assert not [t for t in texts if "/mnt/shared" in t or "nfs" in t.lower()], texts
    # The bucket's prefix is what the instance profiles may touch (cluster/iam/s3-softfine.json).
    policy = json.loads((CLUSTER / "iam" / "s3-softfine.json").read_text())
    resources = {statement["Resource"] for statement in policy["Statement"]}
    assert resources == {"arn:aws:s3:::BUCKET", f"arn:aws:s3:::BUCKET/{prefix}/*"}
    assert bucket in (CLUSTER / "README.md").read_text()  # the placeholder the README's set-up replaces


def test_a100_nodes_take_credentials_from_instance_profiles():
    config = load("a100")
    worker, head = worker_and_head(config)
    assert head["node_config"]["IamInstanceProfile"] == {"Name": "softfine-ray-head"}
    assert worker["node_config"]["IamInstanceProfile"] == {"Name": "softfine-ray-worker"}
    # The head launches the workers with theirs: it may pass that role, and no other.
    passing = json.loads((CLUSTER / "iam" / "head-pass-worker-role.json").read_text())
    (statement,) = passing["Statement"]
    assert (statement["Action"], statement["Resource"]) == (
        "iam:PassRole",
        "arn:aws:iam::*:role/softfine-ray-worker",
    )
    trust = json.loads((CLUSTER / "iam" / "ec2-trust.json").read_text())
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    # Every profile and policy file the config relies on is created by the README's set-up.
    readme = (CLUSTER / "README.md").read_text()
    for needed_text in (
        "softfine-ray-$node",
        "file://cluster/iam/ec2-trust.json",
        "cluster/iam/s3-softfine.json",
        "file://cluster/iam/head-pass-worker-role.json",
        "AmazonEC2FullAccess",
    ):
        assert needed_text in readme, needed_text


def test_nfs_alternative_is_the_same_cluster_with_shared_disk_storage():
    s3, nfs = load("a100"), load("a100-nfs")
    for key in (
        "max_workers",
        "upscaling_speed",
        "idle_timeout_minutes",
        "head_node_type",
        "file_mounts",
        "rsync_filter",
        "rsync_exclude",
        "setup_commands",
        "worker_start_ray_commands",
        "auth",
    ):
        assert s3[key] == nfs[key], key
    assert s3["docker"]["image"] == nfs["docker"]["image"]
    assert {k: v for k, v in s3["provider"].items() if k != "security_group"} == {
        k: v for k, v in nfs["provider"].items() if k != "security_group"
    }
    assert s3["cluster_name"] != nfs["cluster_name"]  # both may run at once
    for s3_node, nfs_node in zip(worker_and_head(s3), worker_and_head(nfs)):
        for key in ("resources", "min_workers", "max_workers"):
            assert s3_node.get(key) == nfs_node.get(key), key
        for key in ("InstanceType", "ImageId", "InstanceMarketOptions"):
            assert s3_node["node_config"].get(key) == nfs_node["node_config"].get(key), key
    assert s3["head_start_ray_commands"][:2] == nfs["head_start_ray_commands"][:2]
    # The NFS one: the head exports /mnt/shared, the workers mount it, the search stores there,
    # MLflow's artifacts stay on the head's disk.
    assert "--volume=/mnt/shared:/mnt/shared" in nfs["docker"]["run_options"]
    assert any("exportfs" in c for c in nfs["initialization_commands"])
    (worker_nfs, _) = worker_and_head(nfs)
    assert any("mount -t nfs4" in c and "/mnt/shared" in c for c in worker_nfs["initialization_commands"])
    assert mlflow_destination(nfs) is None
    assert "/mnt/shared/ray_results" in storage_paths_in_readme()


def test_a_misspelt_node_config_field_fails_the_simulated_launch(simulated_aws):
    """What the launch test relies on: EC2's API model refuses a field it does not know."""
    import botocore.exceptions
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    resolved = _bootstrap_config(load("a100"), no_config_cache=True)
    node_config = copy.deepcopy(resolved["available_node_types"]["a100_x8"]["node_config"])
    node_config["InstanceMarketOption"] = node_config.pop("InstanceMarketOptions")
    provider = AWSNodeProvider(resolved["provider"], resolved["cluster_name"])
    with pytest.raises(botocore.exceptions.ParamValidationError, match="InstanceMarketOption"):
        provider.create_node(node_config, {"ray-user-node-type": "a100_x8"}, 1)
