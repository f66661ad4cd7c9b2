-- Scenario "pairs": spawn, then destroy what was spawned. Each answered spawn queues its
-- VM; the next request (on whichever connection is free) destroys the oldest queued VM,
-- so spawns and destroys alternate and the tenant's VM count stays below the connection
-- count.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

local spawn, token

function init(args)
   load_entries()
   token = entries[1].token
   spawn = spawn_request(token)
end

function request()
   local item = pop_spawned()
   if item then
      return destroy_request(item.token, item.vm)
   end
   return spawn
end

function response(status, headers, body)
   count(status, body)
   if status == 201 then
      push_spawned(body)
   end
end
