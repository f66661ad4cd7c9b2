-- Scenario "status": GET /v1/vms/{id}, rotating over the pre-created VMs.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

local prepared, i = {}, 0

function init(args)
   load_entries()
   for k, entry in ipairs(entries) do
      prepared[k] = status_request(entry)
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
