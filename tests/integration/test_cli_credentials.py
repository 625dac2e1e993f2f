"""``mailbroker cert create`` and ``mailbroker consent microsoft`` against the sandbox, and what
``doctor`` says about certificate and delegated credentials."""

from __future__ import annotations

from mailbroker.integrations import parse_integration, unredacted

from mailbroker_cli.certificates import self_signed
from tests.integration.test_cli import cli  # noqa: F401 (the fixture)


def test_cert_create_stores_the_key_and_doctor_passes_once_the_certificate_is_uploaded(
    cli,  # noqa: F811
    tmp_path,
):
    document = cli.microsoft("cert-made")
    target = tmp_path / "upload-me.cer"

    code, out, err = cli("cert", "create", "cert-made", "--out", str(target), "--days", "90")
    stored = cli.store.get("cert-made")
    before_upload, _, _ = cli("doctor", "cert-made")
    cli.tokens.add_microsoft_certificate(document["tenant_id"], document["client_id"], target.read_text())
    after_code, after, _ = cli("doctor", "cert-made")

    key = stored.client_certificate.private_key.get_secret_value()
    assert code == 0
    assert str(target) in out and "Certificates & secrets" in err
    assert stored.client_secret is None
    assert stored.client_certificate.certificate.strip() == target.read_text().strip()
    assert "PRIVATE KEY" not in target.read_text()
    assert key not in out + err + after
    assert before_upload == 1
    assert after_code == 0, after
    assert "key matches" in after and "89 days left" in after


def test_doctor_names_a_key_that_does_not_match_its_certificate(cli):  # noqa: F811
    cli.microsoft("cert-bad")
    _, cert = self_signed("mailbroker cert-bad")
    other_key, _ = self_signed("mailbroker other")
    document = unredacted(cli.store.get("cert-bad"))
    del document["client_secret"]
    document["client_certificate"] = {"private_key": other_key, "certificate": cert}
    cli.store.put(parse_integration(document))

    code, report = cli.json("doctor", "cert-bad")

    steps = {step["name"]: step for step in report["steps"]}
    assert code == 1
    assert steps["cert"]["ok"] is False and steps["cert"]["code"] == "token_certificate_mismatch"
    assert steps["token"]["code"] == "token_certificate_mismatch"
