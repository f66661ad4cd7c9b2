-- Scenario "spawn": POST /v1/vms as the first tenant of the data file; nothing destroyed.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

local prepared

function init(args)
   load_entries()
   prepared = spawn_request(entries[1].token)
end

function request()
   return prepared
end

function response(status, headers, body)
   count(status, body)
end
