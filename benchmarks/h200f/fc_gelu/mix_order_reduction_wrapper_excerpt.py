            # Call mix order reduction kernel
            # Topologically Sorted Source Nodes: [view_223, convert_element_type_277, mul_53, mul_54, sum_5, layer_norm_24, mul_55, sum_6, mul_56, sub_29, sub_30, div_2, mul_57, mul_58, sum_7, sum_8, convert_element_type_279], Original ATen: [aten.view, aten._to_copy, aten.native_layer_norm_backward, aten.native_layer_norm]
            workspace_0 = empty_strided_cuda((2097152, ), (1, ), torch.float32)
            stream0 = get_raw_stream(0)
            triton_per_fused__to_copy_native_layer_norm_native_layer_norm_backward_view_2.run(buf3, primals_103, add_74, getitem_97, rsqrt_24, buf11, workspace_0, 32768, 512, stream=stream0)
            buf8 = workspace_0[0 * 2048 * 512 : (0 + 1) * 2048 * 512].view(2048, 512).sum(dim=0)
            buf10 = workspace_0[1 * 2048 * 512 : (1 + 1) * 2048 * 512].view(2048, 512).sum(dim=0)
            del workspace_0
