-- Scenario "spawn_many": POST /v1/vms, each request as the next tenant of the data file
-- (one line per tenant), so writes spread over many tenants' row locks.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

local prepared, i = {}, 0

function init(args)
   load_entries()
   for k, entry in ipairs(entries) do
      prepared[k] = spawn_request(entry.token)
   end
   i = thread_number
end

function request()
   i = i % #prepared + 1
   return prepared[i]
end

function response(status, headers, body)
   count(status, body)
end
