"""A first pass through the in-process API and a live server."""

from __future__ import annotations

from conftest import Api, LiveServer


async def test_spawn_list_destroy(api: Api) -> None:
    token = (await api.provision("acme")).bearer
    response = await api.spawn(token, name="web")
    assert response.status_code == 201
    vm = await response.get_json()
    assert response.headers["Location"] == f"/v1/vms/{vm['id']}"
    listing = await (await api.client.get("/v1/vms", headers={"Authorization": token})).get_json()
    assert [v["id"] for v in listing["vms"]] == [vm["id"]]
    gone = await api.client.delete(f"/v1/vms/{vm['id']}", headers={"Authorization": token})
    assert await gone.get_json() == {"id": vm["id"], "state": "destroyed"}


async def test_live_server_answers(live_server: LiveServer) -> None:
    async with live_server.client() as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
