-- Orthanc auto-routing for cxr-sr-node: every stable CR/DX series goes to the CXRSR modality, and
-- the derived series that cxr-sr-node sends back is never routed again (no loop).
--
-- A series is "stable" when Orthanc has received no new instance of it for StableAge seconds
-- (orthanc.json). Routing per series rather than per study sends only the CR/DX series of a mixed
-- study; routing per instance would open one association per image.
--
-- Loop guard, twice over: our output carries "SR x4 (CSAEGAN)" in its SeriesDescription, and it
-- arrives from the AE title CXRSR. cxr-sr-node also skips its own output if it ever gets it.

local TARGET = 'CXRSR'                      -- the modality name in orthanc.json "DicomModalities"
local MARKER = 'SR x4 (CSAEGAN)'            -- in the SeriesDescription of every derived series
local ROUTED_MODALITIES = { CR = true, DX = true }

local function isOurOutput(series)
   local description = series['MainDicomTags']['SeriesDescription'] or ''
   if string.find(description, MARKER, 1, true) then  -- plain find: no Lua patterns
      return true
   end
   local instances = series['Instances']
   if instances ~= nil and #instances > 0 then
      local remoteAet = RestApiGet('/instances/' .. instances[1] .. '/metadata/RemoteAET', false)
      if remoteAet == TARGET then
         return true
      end
   end
   return false
end

function OnStableSeries(seriesId, tags, metadata)
   -- read the series from the index instead of trusting which tags the callback passes
   local series = ParseJson(RestApiGet('/series/' .. seriesId))
   local modality = series['MainDicomTags']['Modality'] or ''
   if not ROUTED_MODALITIES[modality] then
      return
   end
   if isOurOutput(series) then
      print('cxr-sr autoroute: not routing series ' .. seriesId .. ' (our own output)')
      return
   end
   print('cxr-sr autoroute: sending ' .. modality .. ' series ' .. seriesId .. ' to ' .. TARGET)
   -- an asynchronous job: visible (and retryable) under /jobs, does not block Orthanc's Lua thread
   -- (DumpJson without keepStrings: with it, numbers become strings that Orthanc refuses)
   RestApiPost('/modalities/' .. TARGET .. '/store', DumpJson({ Resources = { seriesId }, Asynchronous = true }))
end
