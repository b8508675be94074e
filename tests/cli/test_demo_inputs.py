def test_demo_refuses_a_missing_checkpoint_in_one_line_before_any_stage(tmp_path, capsys):
    from fnl.cli.demo import main

    assert main(["--output", str(tmp_path / "demo"), "--ckpt", str(tmp_path / "none.pth")]) == 2
    assert f"checkpoint not found: {tmp_path / 'none.pth'}" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
