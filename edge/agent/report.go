package agent

import (
	"github.com/llorch/llorch/edge/gpu"
	"github.com/llorch/llorch/edge/handoff"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
)

// statusReport is what a heartbeat says about the node.
func statusReport(inv gpu.Inventory, snap handoff.Snapshot, draining bool) *llorchv1.NodeStatusReport {
	pools, errs := poolReport(snap, draining)
	return &llorchv1.NodeStatusReport{
		GpuInventory: gpuReport(inv), Pools: pools, HandoffErrors: errs, Draining: draining,
		DroppedReplicas: int32(snap.DroppedReplicas), DroppedHandoffErrors: int32(snap.DroppedErrors),
	}
}

// gpuReport is the GPU inventory as the API carries it.
func gpuReport(inv gpu.Inventory) *llorchv1.GpuInventory {
	out := &llorchv1.GpuInventory{DriverVersion: inv.DriverVersion, CudaVersion: inv.CUDAVersion, Unavailable: inv.Unavailable}
	for _, d := range inv.Devices {
		out.Gpus = append(out.Gpus, &llorchv1.Gpu{
			Index: int32(d.Index), Uuid: d.UUID, Name: d.Name,
			MemoryTotalBytes: d.MemoryTotalBytes, MemoryUsedBytes: d.MemoryUsedBytes,
			UtilizationPercent: d.UtilizationPercent, TemperatureC: d.TemperatureC,
		})
	}
	return out
}

// poolReport is the handoff view as the API carries it: pools with their
// replicas, and the files that could not be read.
func poolReport(snap handoff.Snapshot, draining bool) ([]*llorchv1.Pool, []*llorchv1.HandoffError) {
	var pools []*llorchv1.Pool
	byID := map[string]*llorchv1.Pool{}
	for _, p := range snap.Pools() {
		pp := &llorchv1.Pool{
			Id: p.ID, Engine: p.Engine, EngineVersion: p.EngineVersion, Model: p.Model,
			SlotsTotal: int32(p.SlotsTotal), SlotsFree: int32(p.SlotsFree),
			Ready: p.ReadyReplicas > 0, Draining: draining,
		}
		if draining {
			pp.SlotsFree = 0
		}
		byID[p.ID] = pp
		pools = append(pools, pp)
	}
	for _, r := range snap.Replicas {
		if p, ok := byID[r.PoolID]; ok {
			p.Replicas = append(p.Replicas, &llorchv1.Replica{
				Id: r.ReplicaID, Url: r.URL, Ready: r.Ready, ProbeError: r.ProbeError,
				DeviceMask: r.DeviceMask, Slots: int32(r.Slots), Pid: int32(r.PID), File: r.File,
			})
		}
	}
	var errs []*llorchv1.HandoffError
	if snap.DirError != "" {
		errs = append(errs, &llorchv1.HandoffError{File: ".", Reason: snap.DirError})
	}
	for _, e := range snap.Errors {
		errs = append(errs, &llorchv1.HandoffError{File: e.File, Reason: e.Reason})
	}
	return pools, errs
}
