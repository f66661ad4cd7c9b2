-- Scenario "mix": round-robin over every tenant of the data file (one pre-created VM
-- each); per request 70% status GET of that tenant's VM, 15% spawn as that tenant, 15%
-- destroy of a VM this thread spawned earlier (a spawn when there is none yet).
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

local reads, spawns, i = {}, {}, 0

function init(args)
   load_entries()
   for k, entry in ipairs(entries) do
      reads[k] = status_request(entry)
      spawns[k] = spawn_request(entry.token)
   end
   i = (thread_number * 7919) % #entries
end

function request()
   i = i % #entries + 1
   local r = math.random()
   if r < 0.15 then
      local item = pop_spawned()
      if item then
         return destroy_request(item.token, item.vm)
      end
      return spawns[i]
   elseif r < 0.30 then
      return spawns[i]
   end
   return reads[i]
end

function response(status, headers, body)
   count(status, body)
   if status == 201 then
      push_spawned(body)
   end
end
