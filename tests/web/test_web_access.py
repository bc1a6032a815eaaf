"""Who may use the web page and what it may load, without a browser: model paths outside the page's folders refused
after symlinks and `..` are resolved, the warning for a page served beyond this machine without a login, the logins of
`serve --auth/--auth-file`, and the bounds on the work of one request."""
import pytest

from scalegen.cli.main import main
from scalegen.cli.serve import read_logins
from scalegen.errors import UserError
from scalegen.runs.names import SHIPPED, SHIPPED_DIT, SHIPPED_VAR, SHIPPED_VAR_REFINER
from scalegen.web import app
from scalegen.web.access import allowed_model_path, exposure_warning, model_folders, named_folders


@pytest.fixture
def folders(tmp_path):
    """models/ (allowed, holding a run and a symlink that leaves it) beside private/ (not allowed)."""
    (tmp_path / "models" / "run").mkdir(parents=True)
    (tmp_path / "private" / "secret").mkdir(parents=True)
    (tmp_path / "models" / "escape").symlink_to(tmp_path / "private" / "secret")
    (tmp_path / "inside").symlink_to(tmp_path / "models" / "run")  # a link from outside into the folder
    return tmp_path, named_folders([str(tmp_path / "models")])


def test_a_path_inside_the_model_folders_is_allowed_even_through_a_symlink(folders):
    root, allowed = folders
    assert allowed_model_path(f" {root}/models/run ", allowed) == root / "models" / "run"
    assert allowed_model_path(f"{root}/models/run/../run", allowed) == root / "models" / "run"
    assert allowed_model_path(str(root / "inside"), allowed) == root / "models" / "run"  # where it leads counts


@pytest.mark.parametrize("path", ["models/escape", "models/../private/secret", "models/run/../../private",
                                  "private/secret", "/etc"])
def test_a_path_that_leads_outside_is_refused_in_one_line(folders, path):
    root, allowed = folders
    with pytest.raises(UserError, match="outside the folders this page loads models from") as error:
        allowed_model_path(path if path.startswith("/") else str(root / path), allowed)
    assert "\n" not in str(error.value) and "--models-dir" in str(error.value)


def test_the_default_folders_are_the_shipped_ones_and_those_of_the_models_given(folders, tmp_path):
    root, _ = folders
    checkpoint = root / "private" / "model.pt"
    checkpoint.touch()
    assert model_folders([str(SHIPPED_DIT), str(root / "models" / "run"), str(checkpoint), None]) == (
        SHIPPED.resolve(), SHIPPED_DIT.resolve(), root / "models" / "run", root / "private")  # a file: its folder
    with pytest.raises(UserError, match="--models-dir .*missing is not a folder"):
        named_folders([str(root / "missing")])


def test_serving_beyond_this_machine_without_a_login_warns():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert exposure_warning(host, None) is None
    for host in ("0.0.0.0", "192.168.1.5", "my-server"):
        warning = exposure_warning(host, None)
        assert warning.startswith(f"warning: serving on {host} without a login") and "--auth" in warning
        assert exposure_warning(host, [("user", "secret")]) is None


def test_logins_from_auth_and_auth_file(tmp_path):
    assert read_logins(None, None) is None
    assert read_logins("ann:pa:ss", None) == [("ann", "pa:ss")]  # the password may hold ':'
    logins = tmp_path / "logins"
    logins.write_text("bob:one\n\n carl:two\r\n")
    assert read_logins("ann:x", str(logins)) == [("ann", "x"), ("bob", "one"), ("carl", "two")]
    for auth, message in (("ann", "--auth is not USER:PASSWORD"), (":secret", "--auth is not"),
                          ("ann:", "--auth is not")):
        with pytest.raises(UserError, match=message) as error:
            read_logins(auth, None)
        assert "secret" not in str(error.value)  # the password is never shown
    logins.write_text("bob:one\nbob-without-password\n")
    with pytest.raises(UserError, match=f"line 2 of {logins} is not USER:PASSWORD"):
        read_logins(None, str(logins))
    logins.write_text("\n")
    with pytest.raises(UserError, match="holds no login"):
        read_logins(None, str(logins))
    with pytest.raises(UserError, match="cannot read --auth-file"):
        read_logins(None, str(tmp_path / "missing"))


def test_the_work_of_one_request_is_bounded_with_a_one_line_message():
    pytest.importorskip("gradio")
    from scalegen.web.app import MAX_PER_CLASS, MAX_SAMPLES_PER_REQUEST, MAX_STEPS, WARNING, Models, load, sample

    models = Models()  # nothing loaded: the bounds are checked before any model is asked
    request = dict(choice="both", classes=[f"class {index}" for index in range(10)], per_class=MAX_PER_CLASS,
                   seed=0, dit_cfg=1.0, var_cfg=1.0, sampler="euler", steps=MAX_STEPS, top_k=0, top_p=0.0,
                   flow_steps=10, flow_sampler="euler", label_rows=False, prune=False, refine=False)
    assert sample(models, **request)[4] == WARNING + "no DiT is loaded: give its path under Models"  # within bounds
    for change, message in (({"per_class": MAX_PER_CLASS + 1}, f"samples per class must be a whole number from 1 "
                                                                f"to {MAX_PER_CLASS}, not {MAX_PER_CLASS + 1}"),
                            ({"steps": MAX_STEPS + 1}, f"DiT steps must be a whole number from 1 to {MAX_STEPS}"),
                            ({"steps": 2.5}, "DiT steps must be a whole number from 1 to 250, not 2.5"),
                            ({"classes": [f"class {index}" for index in range(11)]},
                             f"220 images asked (11 classes × 10 × 2 models); a request draws at most "
                             f"{MAX_SAMPLES_PER_REQUEST}")):
        figures = sample(models, **{**request, **change})[4]
        assert figures.startswith(WARNING + message) and "\n" not in figures
    refused = load(models, "/etc", "", "")[0]
    assert refused == WARNING + "/etc is outside the folders this page loads models from: start `scalegen serve` " \
                                "with --models-dir naming its folder"


@pytest.mark.parametrize("var", [str(SHIPPED_VAR), "shipped:var"], ids=["path", "shipped-name"])
def test_serve_gives_the_shipped_var_its_refiner_however_the_var_is_named(monkeypatch, var):
    served = {}
    monkeypatch.setattr(app, "serve", lambda dit, var, host, port, **options: served.update(options))
    main(["serve", "--var", var])
    assert served["refiner"] == str(SHIPPED_VAR_REFINER)

