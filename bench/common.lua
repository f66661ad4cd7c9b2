-- What every bench scenario shares; each scenario script loads it with dofile().
--
-- The runner writes a data file (path in BENCH_DATA) with one "tenant token vm_id" line
-- per pre-created VM. The scenario builds its requests from it in init(). response()
-- counts every answer by status, and done() prints one line
--
--   BENCH_JSON {"requests":..,"duration_us":..,"latency_us":{..},"statuses":{..},..}
--
-- for bench/wrk.py to parse: a run with non-2xx answers or socket errors shows them, it
-- is never averaged away. wrk gives each thread its own Lua state, so the counters are
-- per thread and done() (in the main state) adds them up through thread:get().

SPAWN_BODY = '{"vcpus":1,"memory_mib":256,"image":"debian-12"}'

entries = {}        -- {tenant=, token=, vm=} per line of the data file
token_of = {}       -- tenant id -> token
statuses = {}       -- status code -> answers (per thread)
writes_acked = 0    -- 201 answers plus 200 answers of a destroy (per thread)
thread_number = 0   -- set by setup() before init() runs in the thread's state

local threads = {}

function load_entries()
   local path = os.getenv("BENCH_DATA")
   assert(path, "BENCH_DATA is not set")
   for line in io.lines(path) do
      local tenant, token, vm = line:match("^(%S+)%s+(%S+)%s+(%S+)%s*$")
      if tenant then
         entries[#entries + 1] = {tenant = tenant, token = token, vm = vm}
         token_of[tenant] = token
      end
   end
   assert(#entries > 0, "no entries in " .. path)
   math.randomseed(1000 + thread_number)
end

local function headers(token, with_body)
   local h = {["Authorization"] = "Bearer " .. token}
   if with_body then
      h["Content-Type"] = "application/json"
   end
   return h
end

function status_request(entry)
   return wrk.format("GET", "/v1/vms/" .. entry.vm, headers(entry.token))
end

function spawn_request(token)
   return wrk.format("POST", "/v1/vms", headers(token, true), SPAWN_BODY)
end

function destroy_request(token, vm)
   return wrk.format("DELETE", "/v1/vms/" .. vm, headers(token))
end

-- A FIFO of VMs this thread spawned and has not destroyed yet: {vm=, token=}.
local queue, first, last = {}, 1, 0

function push_spawned(body)
   local vm = body:match('"id":"([^"]+)"')
   if vm == nil then
      return
   end
   local tenant = body:match('"tenant":"([^"]+)"')
   -- The floor answers tenant "bench" and ignores tokens: any token will do there.
   last = last + 1
   queue[last] = {vm = vm, token = token_of[tenant] or entries[1].token}
end

function pop_spawned()
   if first > last then
      return nil
   end
   local item = queue[first]
   queue[first] = nil
   first = first + 1
   return item
end

function count(status, body)
   statuses[status] = (statuses[status] or 0) + 1
   if status == 201 then
      writes_acked = writes_acked + 1
   elseif status == 200 and body and body:find('"state":"destroyed"', 1, true) then
      writes_acked = writes_acked + 1
   end
end

function setup(thread)
   threads[#threads + 1] = thread
   thread:set("thread_number", #threads)
end

function done(summary, latency, requests)
   local total, acked = {}, 0
   for _, thread in ipairs(threads) do
      for code, n in pairs(thread:get("statuses")) do
         total[code] = (total[code] or 0) + n
      end
      acked = acked + thread:get("writes_acked")
   end
   local codes = {}
   for code, n in pairs(total) do
      codes[#codes + 1] = string.format('"%d":%d', code, n)
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,' ..
      '"p50":%d,"p90":%d,"p99":%d,"p999":%d},"statuses":{%s},"writes_acked":%d}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency.stdev, latency.max,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), table.concat(codes, ","), acked))
end
