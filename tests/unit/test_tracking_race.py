"""Two runs of one experiment started at once may both find its MLflow experiment missing;
the one whose create loses must use the winner's (tasks/tracking.experiment_id_for)."""

from mlflow.tracking import MlflowClient

from tasks.tracking import experiment_id_for


def test_losing_the_create_race_reads_the_winners_experiment(tmp_path, monkeypatch):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    winner = client.create_experiment("race")
    seen = []
    real_get = client.get_experiment_by_name

    def get_missing_first(name):  # the first lookup happens before the other run's create
        seen.append(name)
        return None if len(seen) == 1 else real_get(name)

    monkeypatch.setattr(client, "get_experiment_by_name", get_missing_first)
    assert experiment_id_for(client, "race") == winner
    assert len(seen) == 2


def test_a_missing_experiment_is_created_once(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = experiment_id_for(client, "fresh")
    assert experiment_id_for(client, "fresh") == first == client.get_experiment_by_name("fresh").experiment_id
