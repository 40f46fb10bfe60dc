"""The operations-centre web console (`cityops console`): a dashboard like any other, it
subscribes to the tier topics, keeps what it has seen in SQLite (store), and shows each user
the incidents of their scope (app, auth); acknowledgements go back to the acks topic (feeds)."""
